"""Export: merged checkpoints equal their adapter models, load in transformers and vLLM, and bad input is refused."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from conftest import PROMPTS, TUCKA_CONFIG, save_adapter
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import tucka_llm
from tucka_llm.data import load_metamathqa, tokenize_metamathqa
from tucka_llm.eval.backends import EvalError, HFBackend
from tucka_llm.export import ExportError, export_merged
from tucka_llm.loading import LoadError
from tucka_llm.models import tiny_llama_config
from tucka_llm.training import parse_options
from tucka_llm.training.adapters import load_base_model
from tucka_llm.tucka.calibration import ROUTER_CALIBRATION, calibration_batches
from tucka_llm.tucka.dai import routing_layers
from tucka_llm.tucka.model import routing_states

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def merged_tucka(adapters, tmp_path_factory) -> Path:
    """The TuckA adapter exported through the command line in fp32, sharded to show the index."""
    out = tmp_path_factory.mktemp("merged") / "tucka-fp32"
    result = run_export("--adapter", adapters["tucka"], "--out", out, "--dtype", "float32", "--max-shard-size", "4MB")
    assert result.returncode == 0, result.stderr
    return out


def run_export(*args: object) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "launch" / "export.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def logits(model, tokenizer) -> torch.Tensor:
    tokenizer.padding_side = "right"
    with torch.no_grad():
        return model(**tokenizer(PROMPTS, return_tensors="pt", padding=True)).logits


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def adapter_model(base_dir: Path, adapter_dir: Path) -> peft.PeftModel:
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


# ------------------------------------------------------------------------------------------------- exactness
def recorded_selection(record: dict) -> tucka_llm.Route | tucka_llm.RouteMixture:
    """What tucka_route.json says was folded: one route, or a mixture of routes."""
    if record["group"] is not None:
        return tucka_llm.Route(record["group"], record["gates"])
    return tucka_llm.RouteMixture([(p["weight"], tucka_llm.Route(p["group"], p["gates"])) for p in record["mixture"]])


def calibration_routes(model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Each calibration sequence's route (group, gates) in sequence mode: the 32 sequences conftest calibrated on."""
    data = tokenize_metamathqa(load_metamathqa("gsm8k-train", 64), tokenizer, 128).dataset
    groups, gates = [], []
    with tucka_llm.routing(model, "sequence"), torch.no_grad():
        for batch in calibration_batches(data, 32, 42, tokenizer):
            model(**batch)
            route = routing_states(model)["default"].route
            groups.append(route.group)
            gates.append(route.gates)
    return torch.cat(groups), torch.cat(gates)


def test_fp32_tucka_export_equals_the_adapter_model_under_the_selection_it_records(
    merged_tucka, adapters, tiny_model, tokenizer
):
    record = json.loads((merged_tucka / "tucka_route.json").read_text())
    model = adapter_model(tiny_model, adapters["tucka"])
    with tucka_llm.routing(model, recorded_selection(record)):
        expected = logits(model, tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(merged_tucka)
    assert relative_error(logits(merged, tokenizer), expected) <= 1e-5
    assert record["router"] == "centred" and record["calibration"]["features"]["source"] == "recorded by training"


def test_default_export_folds_the_mean_update_over_the_calibration_sequences_routes(
    merged_tucka, adapters, tiny_model, tokenizer
):
    """W' - W equals the mean over the calibration sequences of each one's own update, computed independently by
    running the unmerged adapter on them in sequence mode."""
    model = adapter_model(tiny_model, adapters["tucka"])
    groups, gates = calibration_routes(model, tokenizer)
    assert len(set(groups.tolist())) > 1, "the calibration routes span one group: the test would prove little"
    record = json.loads((merged_tucka / "tucka_route.json").read_text())
    shares = torch.bincount(groups, minlength=3).double() / len(groups)
    assert record["calibration"]["group_share"] == pytest.approx(shares.tolist())
    assert record["served_share"] is None and "Exact for no single input" in (merged_tucka / "README.md").read_text()

    merged = AutoModelForCausalLM.from_pretrained(merged_tucka).state_dict()
    name = "model.layers.1.self_attn.v_proj"
    layer = model.base_model.model.get_submodule(name)
    weight = layer.get_base_layer().weight.detach().double()
    updates = []
    for group, gate in zip(groups.tolist(), gates, strict=True):
        u, m = (f.double() for f in layer.merge_factors("default", tucka_llm.Route(group, gate.tolist())))
        updates.append(((weight @ u) @ m.t()) @ u.t())
    expected = torch.stack(updates).mean(dim=0)
    actual = merged[f"{name}.weight"].double() - weight
    assert float((actual - expected).norm() / expected.norm()) <= 1e-5


def test_majority_route_is_the_most_taken_group_with_its_mean_gates(adapters, tiny_model, tokenizer, tmp_path):
    result = export_merged(adapters["tucka"], tmp_path / "merged", route="majority", dtype="float32")
    groups, gates = calibration_routes(adapter_model(tiny_model, adapters["tucka"]), tokenizer)
    counts = torch.bincount(groups, minlength=3)
    group = int(counts.argmax())
    assert result.route.route.group == group
    assert list(result.route.route.gates) == pytest.approx(gates[groups == group].mean(0).tolist(), abs=1e-6)
    share = float(counts[group]) / len(groups)
    assert result.route.served_share == pytest.approx(share)
    assert f"Exact for the {100 * share:.1f}% of inputs" in (tmp_path / "merged" / "README.md").read_text()


def test_merged_directory_is_a_plain_sharded_checkpoint_with_tokenizer_and_model_card(merged_tucka, adapters):
    names = {p.name for p in merged_tucka.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer_config.json"}
    expected |= {"tokenizer.json", "README.md", "tucka_route.json", "tucka_export.json"}
    assert expected <= names
    shards = sorted(merged_tucka.glob("model-*.safetensors"))
    assert len(shards) > 1
    keys = [key for shard in shards for key in load_file(shard)]
    assert not [key for key in keys if "tucka" in key or "lora" in key or "base_layer" in key]
    assert set(keys) == set(AutoModelForCausalLM.from_config(tiny_llama_config()).state_dict())
    assert not {"adapter_config.json", "adapter_model.safetensors", ROUTER_CALIBRATION} & names
    assert "peft" not in (merged_tucka / "config.json").read_text()
    assert not [p.name for p in merged_tucka.parent.iterdir() if p.name.startswith(".")]  # no temporary left

    card = (merged_tucka / "README.md").read_text()
    assert str(adapters["tucka"]) in card and "float32" in card and f"tucka-llm {tucka_llm.__version__}" in card
    record = json.loads((merged_tucka / "tucka_export.json").read_text())
    assert record["method"] == "tucka" and record["adapter_config"]["r"] == 4


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fp32_lora_and_dora_exports_equal_peft_unmerged_logits(method, adapters, tiny_model, tokenizer, tmp_path):
    expected = logits(adapter_model(tiny_model, adapters[method]), tokenizer)
    result = export_merged(adapters[method], tmp_path / "merged", dtype="float32")
    assert result.method == method and result.route is None
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert relative_error(logits(merged, tokenizer), expected) <= 1e-5
    assert not (tmp_path / "merged" / "tucka_route.json").exists()


@pytest.mark.parametrize("method", ["tucka", "dora"])
def test_bf16_export_is_the_fp32_merge_rounded_once(method, adapters, tokenizer, tmp_path):
    export_merged(adapters[method], tmp_path / "fp32", dtype="float32")
    export_merged(adapters[method], tmp_path / "bf16")  # the default dtype
    fp32 = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32")
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert bf16.dtype == torch.bfloat16
    reference = fp32.state_dict()
    for name, weight in bf16.state_dict().items():  # bit for bit: one rounding of the fp32 merge, not two
        assert torch.equal(weight, reference[name].to(torch.bfloat16)), name
    error = relative_error(logits(bf16.float(), tokenizer), logits(fp32, tokenizer))
    print(f"{method}: bf16 export, relative logit error against the fp32 merge: {error:.2e}")
    assert error < 2**-7  # bf16 keeps 8 significant bits: its weight rounding is at most 2^-9 relative


# ------------------------------------------------------------------------------------------------- routes
def test_group_route_takes_the_mean_gates_of_the_calibration_sequences_routed_to_it(
    adapters, tiny_model, tokenizer, tmp_path
):
    groups, gates = calibration_routes(adapter_model(tiny_model, adapters["tucka"]), tokenizer)
    group = int(groups[0])
    result = export_merged(adapters["tucka"], tmp_path / "merged", route=f"group:{group}", dtype="float32")
    assert result.route.route.group == group
    assert list(result.route.route.gates) == pytest.approx(gates[groups == group].mean(0).tolist(), abs=1e-6)
    assert json.loads((tmp_path / "merged" / "tucka_route.json").read_text())["group"] == group


def test_centroid_route_is_refused_for_the_centred_router_and_folds_the_centroids_route_for_dai(
    adapters, tiny_model, tokenizer, tmp_path
):
    with pytest.raises(ExportError, match="degenerate"):
        export_merged(adapters["tucka"], tmp_path / "merged", route="centroid")
    config = tucka_llm.TuckAConfig(**TUCKA_CONFIG, router="dai", task_type="CAUSAL_LM")
    dai = save_adapter(tmp_path / "dai", tiny_model, config, tokenizer, calibrate=True)
    result = export_merged(dai, tmp_path / "merged", route="centroid", dtype="float32")
    model = adapter_model(tiny_model, dai)
    centroid = load_file(dai / ROUTER_CALIBRATION)["default.centroid"]
    (layer,) = routing_layers(model).values()
    with torch.no_grad():
        active = layer.router("default").route_features(centroid.unsqueeze(0))
    assert result.route.route.group == int(active.group[0])
    assert list(result.route.route.gates) == pytest.approx(active.gates[0].tolist(), abs=1e-7)
    assert result.route.chosen_by == "the router's choice for the calibration centroid"


def test_explicit_route_is_folded_as_given(adapters, tiny_model, tokenizer, tmp_path):
    export_merged(adapters["tucka"], tmp_path / "merged", route="group:2:0.35,0.65", dtype="float32")
    record = json.loads((tmp_path / "merged" / "tucka_route.json").read_text())
    assert (record["group"], record["gates"], record["chosen_by"]) == (2, [0.35, 0.65], "explicit gates (--route)")
    model = adapter_model(tiny_model, adapters["tucka"])
    with tucka_llm.routing(model, tucka_llm.Route(2, [0.35, 0.65])):
        expected = logits(model, tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert relative_error(logits(merged, tokenizer), expected) <= 1e-5


def test_calibration_features_are_recomputed_from_data_when_training_recorded_none(adapters, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for file in adapters["tucka"].iterdir():
        if file.name != ROUTER_CALIBRATION:
            (adapter / file.name).write_bytes(file.read_bytes())
    with pytest.raises(ExportError, match="--calibration-data"):
        export_merged(adapter, tmp_path / "merged")
    result = export_merged(adapter, tmp_path / "merged", calibration_data="gsm8k-train", calibration_samples=32)
    record = json.loads((tmp_path / "merged" / "tucka_route.json").read_text())
    source = {"source": "recomputed at export", "data": "gsm8k-train", "samples": 32, "seed": 42}
    assert record["calibration"]["features"] == source and record["calibration"]["sequences"] == 32
    assert sum(w for w, _ in result.route.route.parts) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------- vLLM
VLLM_GREEDY = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True,
          kv_cache_memory_bytes=64 * 1024**2, seed=0)
outputs = llm.generate(json.loads(sys.argv[2]), SamplingParams(temperature=0.0, max_tokens=int(sys.argv[3])))
print("TOKENS=" + json.dumps([list(o.outputs[0].token_ids) for o in outputs]))
"""


def test_merged_checkpoint_serves_in_vllm_with_the_greedy_tokens_of_transformers(merged_tucka):
    pytest.importorskip("vllm", reason="the eval-cpu extra installs vLLM's CPU build")
    new_tokens = 12
    env = os.environ | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    command = [sys.executable, "-c", VLLM_GREEDY, str(merged_tucka), json.dumps(PROMPTS), str(new_tokens)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.split("TOKENS=")[-1])

    tokenizer = AutoTokenizer.from_pretrained(merged_tucka)  # the tokenizer the checkpoint carries
    model = AutoModelForCausalLM.from_pretrained(merged_tucka)
    expected = []
    for prompt in PROMPTS:  # one at a time: no padding, as vLLM sees each prompt
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
        expected.append(out[0, ids.shape[1] :].tolist())
    assert served == expected


# ------------------------------------------------------------------------------------------------- refusals
def test_non_empty_output_is_refused_without_force_and_replaced_with_it(adapters, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ExportError, match="exists and is not empty; pass --force"):
        export_merged(adapters["lora"], out)
    assert (out / "precious.txt").read_text() == "keep me"
    export_merged(adapters["lora"], out, force=True)
    assert (out / "config.json").is_file() and not (out / "precious.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # neither the temporary nor the old directory left


def test_a_failed_write_leaves_the_previous_output_untouched(adapters, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    export_merged(adapters["lora"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tucka_llm.export.merge.model_card", disk_full)  # fails after the weights are written
    with pytest.raises(OSError, match="No space left"):
        export_merged(adapters["lora"], out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_output_that_would_replace_an_input_is_refused_even_with_force(adapters, tiny_model):
    with pytest.raises(ExportError, match="would delete the input"):
        export_merged(adapters["lora"], adapters["lora"], force=True)
    with pytest.raises(ExportError, match="would delete the input"):
        export_merged(adapters["lora"], adapters["lora"].parent, force=True)
    with pytest.raises(ExportError, match="would delete the input"):
        export_merged(adapters["lora"], tiny_model, force=True)


def test_missing_or_unfinished_or_broken_adapters_are_refused(adapters, tmp_path):
    with pytest.raises(LoadError, match="no such directory"):
        export_merged(tmp_path / "nowhere", tmp_path / "out")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(LoadError, match=r"has not finished.*checkpoints/checkpoint-N"):
        export_merged(run, tmp_path / "out")
    (run / "adapter_config.json").write_text("{}")
    with pytest.raises(LoadError, match=r"no adapter_model.safetensors"):
        export_merged(run, tmp_path / "out")
    (run / "adapter_model.safetensors").write_bytes(b"")
    (run / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(LoadError, match=r"adapter_config.json is unreadable"):
        export_merged(run, tmp_path / "out")
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in adapters["lora"].iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LoadError, match="could not load it"):
        export_merged(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_base_of_other_shapes_is_refused_naming_both(adapters, tmp_path):
    other = tiny_llama_config()
    other.hidden_size, other.num_attention_heads = 128, 4
    AutoModelForCausalLM.from_config(other).save_pretrained(tmp_path / "other-base")
    for method in ("tucka", "lora"):
        with pytest.raises(LoadError, match=r"does not fit --base .*other-base.*Pass the base model"):
            export_merged(adapters[method], tmp_path / "out", base=str(tmp_path / "other-base"))
    with pytest.raises(LoadError, match=r"--base .*missing-base: could not load it"):
        export_merged(adapters["lora"], tmp_path / "out", base=str(tmp_path / "missing-base"))


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ("group:3", r"group 3 is out of range; this adapter has k=3 groups: 0\.\.2"),
        ("group:-1:0.5,0.5", "group -1 is out of range"),
        ("group:0:1.0", "1 gates given, but each group has t=2 experts: give 2"),
        ("group:0:0.5,nan", "every gate must be a finite number >= 0"),
        ("group:0:0.5,-1", "every gate must be a finite number >= 0"),
        ("group:one", "group 'one' is not an integer"),
        ("group:0:5,1", r"group:I:5,1: this router's gates lie in \[0\.3223, 0\.6777\] \(t=2\); no input takes"),
        ("group:0:1e308,1e308", r"this router's gates lie in \[0\.3223, 0\.6777\]"),
        ("group:0:0.4,0.4", r"this router's gates sum to 1; these sum to 0\.8"),
        ("groups:1", "unknown route"),
    ],
)
def test_bad_routes_are_refused(route, message, adapters, tmp_path):
    with pytest.raises(ExportError, match=message):
        export_merged(adapters["tucka"], tmp_path / "out", route=route)


def test_route_for_a_lora_adapter_is_refused(adapters, tmp_path):
    with pytest.raises(ExportError, match=r"--route applies to TuckA adapters only; .* holds a lora adapter"):
        export_merged(adapters["lora"], tmp_path / "out", route="group:0")


def test_command_line_errors_are_one_line_without_traceback(adapters, tmp_path):
    result = run_export("--adapter", adapters["tucka"], "--out", tmp_path / "out", "--route", "group:7")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --route: group 7 is out of range; this adapter has k=3 groups: 0..2."
    )
    assert "Traceback" not in result.stderr


def base_of_depth(path: Path, layers: int) -> Path:
    """The tiny Llama's width with another number of decoder layers."""
    config = tiny_llama_config()
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_base_of_another_depth_is_refused_naming_the_layers_by_export_and_eval(adapters, tmp_path):
    deeper, shallower = base_of_depth(tmp_path / "deeper", 3), base_of_depth(tmp_path / "shallower", 1)
    for method in ("tucka", "lora"):
        with pytest.raises(LoadError, match=r"does not fit --base .*deeper: the base has adapted layers it holds no "
                                              r"weights for \(layers 2\)\. Pass the base model"):  # fmt: skip
            export_merged(adapters[method], tmp_path / "out", base=str(deeper))
        with pytest.raises(LoadError, match=r"holds weights for layers the base does not have \(layers 1\)"):
            export_merged(adapters[method], tmp_path / "out", base=str(shallower))
        with pytest.raises(LoadError, match=r"does not fit --model .*deeper: the base has adapted layers .*layers 2"):
            HFBackend(str(deeper), adapter=str(adapters[method]))
    assert not (tmp_path / "out").exists()


def test_adapter_with_non_finite_weights_is_refused_by_export_and_eval(adapters, tiny_model, tmp_path):
    diverged = tmp_path / "diverged"
    shutil.copytree(adapters["lora"], diverged)
    weights = load_file(diverged / "adapter_model.safetensors")
    name = sorted(weights)[0]
    weights[name][0, 0] = float("nan")
    save_file(weights, diverged / "adapter_model.safetensors")
    with pytest.raises(LoadError, match=rf"--adapter {diverged}: 1 of its tensors hold NaN or inf values \({name}\)"):
        export_merged(diverged, tmp_path / "out")
    with pytest.raises(LoadError, match=r"hold NaN or inf values"):
        HFBackend(str(tiny_model), adapter=str(diverged))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"device": "cuda:7"}, r"--device cuda:7: not present \(\d+ CUDA devices here\)"),
        ({"device": "gpu"}, r"--device gpu: not a device name"),
        ({"max_shard_size": "5 bogus"}, r"--max-shard-size 5 bogus: not a size"),
        ({"max_shard_size": "0GB"}, r"--max-shard-size 0GB: must be more than 0 bytes"),
        ({"calibration_samples": 0}, r"--calibration-samples must be at least 1, got 0"),
    ],
)
def test_bad_export_flags_are_refused_in_one_line_before_any_work(adapters, tmp_path, flags, message):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")  # an earlier export, which --force would replace
    with pytest.raises(ExportError, match=message) as refused:
        export_merged(adapters["tucka"], tmp_path / "out", force=True, **flags)
    assert "\n" not in str(refused.value)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["config.json"]


def test_a_corrupt_base_is_refused_in_one_line_by_training_export_and_eval(adapters, tiny_model, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model, corrupt)
    (weights,) = corrupt.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(LoadError, match=rf"^--base {corrupt}: could not load it \(.*\)\. Give the base model"):
        export_merged(adapters["lora"], tmp_path / "out", base=str(corrupt))
    with pytest.raises(LoadError, match=rf"^--model {corrupt}: could not load it"):
        HFBackend(str(corrupt))
    with pytest.raises(LoadError, match=rf"^--model {corrupt}: could not load it"):
        load_base_model(parse_options(["--model", str(corrupt)]))


def test_an_export_removes_what_a_killed_export_to_the_same_out_left(adapters, tmp_path):
    stale = [tmp_path / ".merged.k1ll3d_x.tmp", tmp_path / ".merged.abcd1234.old"]
    other = tmp_path / ".merged.v2.abcd1234.tmp"  # an export to merged.v2 (perhaps live): not ours to remove
    for directory in [*stale, other]:
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"\0" * 100)
    export_merged(adapters["lora"], tmp_path / "merged", dtype="float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "merged"]


def test_hf_eval_refuses_an_adapter_of_another_width_or_a_corrupt_one_in_one_line(adapters, tmp_path):
    other = tiny_llama_config()
    other.hidden_size, other.num_attention_heads = 128, 4
    AutoModelForCausalLM.from_config(other).save_pretrained(tmp_path / "wider")
    with pytest.raises(LoadError, match=r"^--adapter .* does not fit --model .*wider: .*Pass the base model") as e:
        HFBackend(str(tmp_path / "wider"), adapter=str(adapters["lora"]))
    assert "\n" not in str(e.value)
    # the first differing tensor named whole, with both shapes, not the last 300 characters of torch's report
    assert re.search(
        r": its \S+lora_A\S* has shape \[8, 64\], the base needs \[8, 128\] \(\d+ more tensors", str(e.value)
    )
    corrupt = tmp_path / "corrupt"
    shutil.copytree(adapters["lora"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LoadError, match=r"^--adapter .*corrupt: could not load it \(.* not a readable safetensors"):
        HFBackend(str(tmp_path / "wider"), adapter=str(corrupt))


def test_a_merge_that_overflows_the_export_dtype_is_refused_and_a_non_finite_model_is_not_evaluated(
    adapters, tiny_model, tmp_path
):
    loud = tmp_path / "loud"
    shutil.copytree(adapters["lora"], loud)
    weights = load_file(loud / "adapter_model.safetensors")
    save_file({k: v * 1e8 if "lora_B" in k else v for k, v in weights.items()}, loud / "adapter_model.safetensors")
    with pytest.raises(ExportError, match=r"^--dtype float16: the merged weight of .*q_proj is not finite .*bfloat16"):
        export_merged(loud, tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out").exists()

    broken = tmp_path / "broken-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(broken)
    with pytest.raises(
        EvalError, match=r"^--model .*broken-model: 1 weights hold NaN or inf values \(model\.layers\.1"
    ):
        HFBackend(str(broken))


FULL = 'message: "No space left on device"'


@pytest.mark.parametrize("form", ["merged", "lora"])
def test_a_full_disk_during_export_is_one_line_and_leaves_nothing_partial(adapters, tmp_path, monkeypatch, form):
    from safetensors import SafetensorError

    from tucka_llm.export import cli
    from tucka_llm.serving import routed_lora

    def full(*args, **kwargs):
        if form == "merged":
            raise SafetensorError(f"Error while serializing: IoError(Os {{ code: 28, kind: StorageFull, {FULL} }})")
        raise OSError(errno.ENOSPC, "No space left on device")

    target = (transformers.PreTrainedModel, "save_pretrained") if form == "merged" else (routed_lora, "save_file")
    monkeypatch.setattr(*target, full)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        cli.main(["--adapter", str(adapters["tucka"]), "--out", str(out), "--format", form])
    assert str(stop.value).startswith(f"error: no space left on the device of --out {out}")
    assert "\n" not in str(stop.value) and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary directory left either

"""Export: merged checkpoints equal their adapter models, load in transformers and vLLM, and bad input is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from conftest import PROMPTS, tiny_llama_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import tucka_llm
from tucka_llm.calibration import ROUTER_CALIBRATION
from tucka_llm.export import ExportError, export_merged
from tucka_llm.tucka.dai import routing_layers
from tucka_llm.tucka.routing import route_from_features, route_scores

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
def test_fp32_tucka_export_equals_the_adapter_model_under_the_route_it_records(
    merged_tucka, adapters, tiny_model, tokenizer
):
    record = json.loads((merged_tucka / "tucka_route.json").read_text())
    route = tucka_llm.Route(record["group"], record["gates"])
    model = adapter_model(tiny_model, adapters["tucka"])
    with tucka_llm.routing(model, route):
        expected = logits(model, tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(merged_tucka)
    assert relative_error(logits(merged, tokenizer), expected) <= 1e-5

    # The default route is the router's choice for the centroid that training recorded.
    centroid = load_file(adapters["tucka"] / ROUTER_CALIBRATION)["default.centroid"]
    (layer,) = routing_layers(model).values()
    centroids = layer.tucka_centroids["default"].detach()
    active = route_from_features(centroids, centroid.unsqueeze(0), 3, 2)
    assert record["group"] == int(active.group[0])
    assert record["gates"] == pytest.approx(active.gates[0].tolist(), abs=1e-7)
    assert record["centroid"]["source"] == "recorded by training"
    assert record["chosen_by"] == "the router's choice for the training-data centroid"


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
def test_group_route_takes_its_gates_from_the_centroid_scores_within_that_group(adapters, tiny_model, tmp_path):
    result = export_merged(adapters["tucka"], tmp_path / "merged", route="group:1", dtype="float32")
    model = adapter_model(tiny_model, adapters["tucka"])
    (layer,) = routing_layers(model).values()
    centroid = load_file(adapters["tucka"] / ROUTER_CALIBRATION)["default.centroid"]
    scores = route_scores(layer.tucka_centroids["default"].detach(), centroid.unsqueeze(0), 3, 2)[0, 1]
    assert result.route.route.group == 1
    assert list(result.route.route.gates) == pytest.approx((scores / scores.sum()).tolist(), abs=1e-7)
    assert json.loads((tmp_path / "merged" / "tucka_route.json").read_text())["group"] == 1


def test_explicit_route_is_folded_as_given(adapters, tiny_model, tokenizer, tmp_path):
    export_merged(adapters["tucka"], tmp_path / "merged", route="group:2:0.25,0.75", dtype="float32")
    record = json.loads((tmp_path / "merged" / "tucka_route.json").read_text())
    assert (record["group"], record["gates"], record["chosen_by"]) == (2, [0.25, 0.75], "explicit gates (--route)")
    model = adapter_model(tiny_model, adapters["tucka"])
    with tucka_llm.routing(model, tucka_llm.Route(2, [0.25, 0.75])):
        expected = logits(model, tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert relative_error(logits(merged, tokenizer), expected) <= 1e-5


def test_centroid_is_recomputed_from_calibration_data_when_training_recorded_none(adapters, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for file in adapters["tucka"].iterdir():
        if file.name != ROUTER_CALIBRATION:
            (adapter / file.name).write_bytes(file.read_bytes())
    with pytest.raises(ExportError, match="--calibration-data"):
        export_merged(adapter, tmp_path / "merged")
    result = export_merged(adapter, tmp_path / "merged", calibration_data="gsm8k-train", calibration_samples=32)
    record = json.loads((tmp_path / "merged" / "tucka_route.json").read_text())
    assert record["centroid"] == {"source": "recomputed at export", "data": "gsm8k-train", "samples": 32, "seed": 42}
    assert 0 <= result.route.route.group < 3 and sum(result.route.route.gates) == pytest.approx(1.0)


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
    with pytest.raises(ExportError, match="no such directory"):
        export_merged(tmp_path / "nowhere", tmp_path / "out")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(ExportError, match=r"has not finished.*checkpoints/checkpoint-N"):
        export_merged(run, tmp_path / "out")
    (run / "adapter_config.json").write_text("{}")
    with pytest.raises(ExportError, match=r"no adapter_model.safetensors"):
        export_merged(run, tmp_path / "out")
    (run / "adapter_model.safetensors").write_bytes(b"")
    (run / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(ExportError, match=r"adapter_config.json is unreadable"):
        export_merged(run, tmp_path / "out")
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in adapters["lora"].iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ExportError, match="could not load it"):
        export_merged(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_base_of_other_shapes_is_refused_naming_both(adapters, tmp_path):
    other = tiny_llama_config()
    other.hidden_size, other.num_attention_heads = 128, 4
    AutoModelForCausalLM.from_config(other).save_pretrained(tmp_path / "other-base")
    for method in ("tucka", "lora"):
        with pytest.raises(ExportError, match=r"does not fit --base .*other-base.*Pass the base model"):
            export_merged(adapters[method], tmp_path / "out", base=str(tmp_path / "other-base"))
    with pytest.raises(ExportError, match=r"--base .*missing-base: could not load it"):
        export_merged(adapters["lora"], tmp_path / "out", base=str(tmp_path / "missing-base"))


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ("group:3", r"group 3 is out of range; this adapter has k=3 groups: 0\.\.2"),
        ("group:-1:0.5,0.5", "group -1 is out of range"),
        ("group:0:1.0", "1 gates given, but each group has t=2 experts: give 2"),
        ("group:0:0.5,nan", "every gate must be a finite number"),
        ("group:one", "group 'one' is not an integer"),
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

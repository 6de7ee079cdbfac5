"""Report: the table joins runs with their evaluations, the numbers are the right statistics, the plots are PNGs with
labelled axes, and the command line prints the table and refuses a directory that is neither a run nor an eval."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from safetensors.torch import save_file

from tucka_llm import report

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
TOKENS_PER_S = [100.0 + 10 * i for i in range(STEPS - 1)]  # steps 2..20; the first log has no throughput
TUCKA_PARAMS = 4 * 64 + 3 * 2 * 2 + 64 * 4  # the trained tensors saved below (not e_bar)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def metrics(tucka: bool, start: float = 1_795_433_000.0) -> list[dict]:
    """``STEPS`` logged steps as RunTrainer writes them: 30 s apart, 12.8 s before the first log."""
    records = []
    for step in range(1, STEPS + 1):
        record = {"step": step, "time": start + 30 * (step - 1), "loss": 2.0 / step, "learning_rate": 1e-3}
        if step > 1:
            record["tokens_per_s"] = TOKENS_PER_S[step - 2]
        record |= {"peak_memory_gb": 10 + step % 7, "peak_memory_gb/rank0": 10 + step % 7, "train_runtime": 12.8}
        if tucka:
            load = [0.5, 0.25 + 0.01 * step, 0.25 - 0.01 * step]
            record |= {f"expert_load/group{i}": share for i, share in enumerate(load)}
            record["routing_entropy"] = -sum(share * math.log(share) for share in load)
        records.append(record)
    return records


def make_run(path: Path, options: dict, records: list[dict], adapter: dict[str, torch.Tensor] | None) -> Path:
    """A training run directory: run_config.json, metrics.jsonl and, when finished, adapter_model.safetensors."""
    write_json(path / "run_config.json", {"options": options, "world_size": 2, "global_batch": 4})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    if adapter is not None:
        save_file(adapter, path / "adapter_model.safetensors")
    return path


def make_eval(path: Path, task: str, accuracy: float, n: int, model: Path, adapter: Path | None = None, **more) -> Path:
    """An evaluation output directory: summary.json as tucka_llm.eval.run writes it (the keys the report reads)."""
    summary = {"task": task, "accuracy": accuracy, "accuracy_project": accuracy, "accuracy_metamath": accuracy}
    summary |= {"scoring": "project", "n": n, "tokens_per_s": 50.0, "generation_seconds": 10.0}
    summary |= {"model": str(model), "adapter": None if adapter is None else str(adapter), "data": task, **more}
    write_json(path / "summary.json", summary)
    return path


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    """A finished TuckA run evaluated on GSM8K through its merged checkpoint, an unfinished LoRA run evaluated as an
    adapter on MATH-500, and the base model evaluated before training."""
    tucka_adapter = {"a": torch.zeros(4, 64), "core": torch.zeros(3, 2, 2), "b": torch.zeros(64, 4)}
    tucka_adapter["q_proj.tucka_router.center"] = torch.zeros(64)  # e_bar: saved with the adapter, never trained
    tucka = make_run(tmp_path / "tucka-r4", {"method": "tucka", "r": 4, "k": 3}, metrics(True), tucka_adapter)
    lora = make_run(tmp_path / "lora-r8", {"method": "lora", "lora_r": 8}, metrics(False), None)
    base, merged = tmp_path / "SmolLM2-135M-Instruct", tmp_path / "m_tucka"
    base.mkdir()
    write_json(merged / "tucka_export.json", {"adapter": str(tucka), "method": "tucka"})
    return {
        "base_eval": make_eval(tmp_path / "base-eval-gsm8k", "gsm8k", 0.05, 40, base),
        "tucka": tucka,
        "lora": lora,
        "tucka_eval": make_eval(tmp_path / "m_tucka-eval-gsm8k", "gsm8k", 0.125, 40, merged),
        "lora_eval": make_eval(tmp_path / "lora-eval-math500", "math", 0.25, 500, base, lora, data="math500"),
    }


def table_rows(table: str) -> dict[str, dict[str, str]]:
    """The Markdown table as {run: {column: cell}}."""
    header, _, *lines = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table.splitlines()]
    return {cells[0]: dict(zip(header, cells, strict=True)) for cells in lines}


# ------------------------------------------------------------------------------------------------------ the table
def test_each_run_gets_one_row_with_its_evaluations_and_an_unlinked_eval_a_row_named_after_its_model(dirs, tmp_path):
    table, _ = report.write_report(list(dirs.values()), tmp_path / "out")

    rows = table_rows(table)
    assert list(rows) == ["SmolLM2-135M-Instruct", "tucka-r4", "lora-r8"]  # the order the arguments name them
    assert rows["tucka-r4"]["GSM8K"] == "12.50 (n=40)"  # linked through m_tucka/tucka_export.json
    assert rows["tucka-r4"]["MATH"] == "–"
    assert rows["lora-r8"]["MATH"] == "25.00 (MATH-500, n=500)"  # linked through the adapter it loaded
    assert rows["lora-r8"]["GSM8K"] == "–"
    assert rows["SmolLM2-135M-Instruct"]["GSM8K"] == "5.00 (n=40)"
    assert rows["SmolLM2-135M-Instruct"]["method"] == rows["SmolLM2-135M-Instruct"]["trainable params"] == "–"


def test_method_labels_name_the_method_and_its_rank(dirs, tmp_path):
    rows = table_rows(report.write_report([dirs["tucka"], dirs["lora"]], tmp_path / "out")[0])

    assert rows["tucka-r4"]["method"] == "TuckA r4 k3"
    assert rows["lora-r8"]["method"] == "LoRA r8"
    assert report.method_label({"method": "tucka", "r": 16, "k": 4, "lora_r": 32}) == "TuckA r16 k4"
    assert report.method_label({"method": "dora", "r": 16, "lora_r": 32}) == "DoRA r32"


def test_trainable_params_count_the_trained_adapter_tensors_and_are_unknown_before_the_run_finished(dirs, tmp_path):
    rows = table_rows(report.write_report([dirs["tucka"], dirs["lora"]], tmp_path / "out")[0])

    assert rows["tucka-r4"]["trainable params"] == f"{TUCKA_PARAMS:,}" == "524"
    assert rows["lora-r8"]["trainable params"] == "–"


def test_throughput_is_the_median_over_steps_memory_the_maximum_and_wall_time_spans_the_logs(dirs, tmp_path):
    rows = table_rows(report.write_report([dirs["tucka"]], tmp_path / "out")[0])

    assert rows["tucka-r4"]["tokens/s"] == "190"  # median of 100, 110, ..., 280
    assert rows["tucka-r4"]["peak memory (GB)"] == "16.00"  # 10 + step % 7 peaks at step 6
    assert rows["tucka-r4"]["wall time"] == "9m 43s"  # 19 intervals of 30 s, plus 12.8 s before the first log


def test_durations_read_as_hours_and_minutes_or_minutes_and_seconds():
    assert report.format_duration(3725) == "1h 02m"
    assert report.format_duration(200) == "3m 20s"
    assert report.format_duration(45.4) == "45s"
    assert report.format_duration(None) == "–"


def test_metrics_lines_that_lack_keys_or_are_cut_off_are_skipped(tmp_path):
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "tokens_per_s": 50.0}, {"step": 3, "tokens_per_s": 70.0}]
    run = make_run(tmp_path / "partial", {"method": "lora", "lora_r": 8}, records, None)
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"step": 4, "loss": 2.')  # killed while writing

    rows = table_rows(report.write_report([run], tmp_path / "out")[0])

    assert rows["partial"]["tokens/s"] == "60"
    assert rows["partial"]["peak memory (GB)"] == rows["partial"]["wall time"] == "–"


# ------------------------------------------------------------------------------------------------------ the plots
def test_plots_are_pngs_loss_for_every_run_and_routing_only_for_tucka(dirs, tmp_path):
    out = tmp_path / "out"
    _, plots = report.write_report(list(dirs.values()), out)

    names = {"loss.png", "tucka-r4_expert_load.png", "tucka-r4_routing_entropy.png"}
    assert {plot.name for plot in plots} == names
    assert {path.name for path in out.iterdir()} == names | {"report.md"}  # no temporary files left behind
    for name in names:
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)
        height, width, _ = imread(out / name).shape
        assert width > 600 and height > 400
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "| tucka-r4 | TuckA r4 k3 |" in text
    assert all(f"[{name}]({name})" in text for name in names)


def test_plots_label_their_axes_and_name_every_series_in_the_legend(dirs):
    tucka, lora = report.load_directory(dirs["tucka"]), report.load_directory(dirs["lora"])

    loss = report.loss_figure([("tucka-r4", tucka), ("lora-r8", lora)]).axes[0]
    load = report.expert_load_figure("tucka-r4", tucka).axes[0]
    entropy = report.routing_entropy_figure("tucka-r4", tucka).axes[0]

    assert (loss.get_xlabel(), loss.get_ylabel()) == ("step", "training loss")
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["tucka-r4", "lora-r8"]
    assert (load.get_xlabel(), load.get_ylabel(), load.get_ylim()) == ("step", "share of routes", (0.0, 1.0))
    assert sorted(t.get_text() for t in load.get_legend().get_texts()) == ["group 0", "group 1", "group 2"]
    assert entropy.get_ylabel() == "routing entropy (nats)"
    uniform = [line for line in entropy.get_lines() if line.get_linestyle() == "--"]
    assert [line.get_ydata()[0] for line in uniform] == [pytest.approx(math.log(3))]
    assert any(t.get_text().startswith("uniform load (ln k") for t in entropy.get_legend().get_texts())
    assert report.expert_load_figure("lora-r8", lora) is None
    assert report.routing_entropy_figure("lora-r8", lora) is None


# ------------------------------------------------------------------------------------------------------ command line
def run_cli(*args: object) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tucka_llm", "report", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)


def test_command_line_writes_the_report_and_prints_the_table(dirs, tmp_path):
    out = tmp_path / "new" / "report"
    result = run_cli(*dirs.values(), "--out", out)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("| run | method | trainable params | tokens/s | peak memory (GB) | GSM8K | MATH |")
    assert table_rows(result.stdout)["tucka-r4"]["GSM8K"] == "12.50 (n=40)"
    assert result.stdout in (out / "report.md").read_text(encoding="utf-8")
    assert (out / "loss.png").read_bytes().startswith(PNG_SIGNATURE)


def test_a_directory_that_is_neither_a_run_nor_an_eval_is_refused_in_one_line(dirs, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli(dirs["tucka"], tmp_path / "empty", "--out", tmp_path / "out")

    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'empty'} has neither run_config.json nor summary.json")
    assert "expected a training run directory" in result.stderr
    assert not (tmp_path / "out").exists()


def two_route_logs(groups_of_step) -> list[dict]:
    """Logged steps of 2 routes (micro-batches) each, as RunTrainer writes them, with 4 groups."""
    records = []
    for step in range(1, 41):
        counts = [0, 0, 0, 0]
        for group in groups_of_step(step):
            counts[group] += 1
        shares = [c / 2 for c in counts]
        records.append(
            {"step": step, "routing_entropy": report.entropy_of(shares)}
            | {f"expert_load/group{i}": s for i, s in enumerate(shares)}
            | {f"expert_routes/group{i}": c for i, c in enumerate(counts)}
        )
    return records


def test_a_balanced_router_reads_as_balanced_though_each_log_holds_two_routes(tmp_path):
    balanced = two_route_logs(lambda step: ((2 * step) % 4, (2 * step + 1) % 4))
    assert max(r["routing_entropy"] for r in balanced) <= math.log(2) + 1e-9  # one log alone can never show ln 4
    _, counts = report.route_counts(balanced)
    assert report.entropy_of(report.windowed_loads(counts, None)[-1]) == pytest.approx(math.log(4))
    rolling = [report.entropy_of(s) for s in report.windowed_loads(counts, report.ROLLING_ROUTES)]
    assert min(rolling[2:]) >= 0.95 * math.log(4)
    assert report.routing_cell(balanced) == "0.25/0.25/0.25/0.25, H 1.39 of ln 4 = 1.39"

    collapsed = two_route_logs(lambda step: (0, 0))
    assert report.routing_cell(collapsed) == "1.00/0.00/0.00/0.00, H 0.00 of ln 4 = 1.39"
    run = make_run(tmp_path / "tucka-balanced", {"method": "tucka", "r": 4, "k": 4}, balanced, None)
    rows = table_rows(report.write_report([run], tmp_path / "out")[0])
    assert rows["tucka-balanced"]["routing (whole run)"] == "0.25/0.25/0.25/0.25, H 1.39 of ln 4 = 1.39"
    assert rows.get("tucka-balanced") and (tmp_path / "out" / "tucka-balanced_routing_entropy.png").is_file()


def test_bitsandbytes_kernels_line_is_kept_out_of_our_commands_output(caplog):
    """On CPUs with AVX-512 BF16 and no `kernels` package, bitsandbytes logs at import (peft imports it) that an
    optional CPU kernel is missing; importing tucka_llm keeps that line from preceding every one-line message."""
    import logging

    import tucka_llm  # noqa: F401  (installs the filter)

    caplog.set_level(logging.WARNING)
    bitsandbytes = logging.getLogger("bitsandbytes.backends.cpu.ops")
    bitsandbytes.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
    bitsandbytes.warning("another bitsandbytes warning")
    assert "gemm_4bit_forward" not in caplog.text and "another bitsandbytes warning" in caplog.text

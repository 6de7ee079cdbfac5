"""bench/gpu_suite.py's CPU dry run: every step of the GPU suite runs, and its table and JSON hold what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def suite(out: Path, work: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "bench/gpu_suite.py", "--dry-run", "--out", str(out), "--workdir", str(work), *flags]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_gpu_suite_dry_run_in_two_commands_trains_merges_generates_and_records_each_section(tmp_path):
    """As in a GPU slot: the first command trains; a second, with the same --workdir, goes on from its runs. Each
    section's rows are in suite.json as soon as it ends."""
    out, work = tmp_path / "results", tmp_path / "work"
    suite(out, work, "--sections", "train")
    first = json.loads((out / "suite.json").read_text())
    assert {r["section"] for r in first["rows"]} == {"training"} and set(first["section_seconds"]) == {
        "build model",
        "train",
    }
    result = suite(out, work, "--sections", "train,overhead,merge,generate")  # train: read back, not run again
    record = json.loads((out / "suite.json").read_text())
    assert record["section_seconds"]["train"] < first["section_seconds"]["train"] / 4
    assert record["dry_run"] is True and record["training"]["tokens_per_sequence"] == 64
    rows = {section: [r for r in record["rows"] if r["section"] == section] for section in
            ("training", "adapter overhead", "merge", "generate")}  # fmt: skip
    assert len(rows) == 4 and sum(map(len, rows.values())) == len(record["rows"])

    assert [r["configuration"] for r in rows["training"]] == [  # DoRA's run is left out of the dry run
        "TuckA r16 k4 t2 p2, bf16 base", "LoRA r32, bf16 base", "TuckA r16 k4 t2 p2, 4-bit NF4 base, bf16 compute",
    ]  # fmt: skip
    for row in rows["training"]:  # every sequence cut to 64 tokens; peak memory is the CPU processes' RSS here
        assert row["tokens_per_s"] > 0 and row["peak_gib"] > 0 and row["details"]["tokens_per_sequence"] == 64
    assert rows["training"][1]["vs_lora"] == "1.000x speed, 1.000x memory"
    assert (work / "tucka-4bit" / "base_quantization.json").is_file()
    assert [r["configuration"].split()[0] for r in rows["adapter overhead"]] == [
        "base", "lora", "tucka-k1", "tucka-k4", "tucka-k16"
    ]  # fmt: skip
    assert all(r["seconds"] > 0 and r["peak_gib"] is None for r in rows["adapter overhead"])  # no CUDA, no memory
    (merge,) = rows["merge"]
    assert merge["seconds"] > 0 and (work / "merged-tucka" / "config.json").is_file()
    (generate,) = rows["generate"]
    assert generate["tokens_per_s"] > 0 and generate["details"]["prompts"] == 2

    table = result.stdout[result.stdout.index("| section |") :].split("\n\n")[0].splitlines()
    assert len(table) == 2 + len(record["rows"])
    assert [line.split(" | ")[1] for line in table[2:]] == [r["configuration"] for r in record["rows"]]

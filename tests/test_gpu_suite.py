"""bench/gpu_suite.py's CPU dry run: every step of the GPU suite runs, and its table and JSON hold what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run_trains_each_configuration_merges_generates_and_records_them(tmp_path):
    out, work = tmp_path / "suite.json", tmp_path / "work"
    command = [sys.executable, "bench/gpu_suite.py", "--dry-run", "--out", str(out), "--workdir", str(work)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads(out.read_text())
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

"""The project as a user installs it: a wheel built from the package alone, installed into a fresh virtual environment
outside the checkout, runs every stage through the ``tucka`` command (training on 2 ranks under DeepSpeed with the
shipped ZeRO config chosen by name, export merged and as routed LoRA, evaluation, held-out loss)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tucka_llm.training.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def run(command: list[object], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(list(map(str, command)), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtual environment outside the checkout holding the wheel of this checkout's package. Its dependencies
    are this test environment's (a path entry, not an install: CI has no time to install torch twice), so what is
    tested is the package: what the wheel ships and how its command starts."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # only what the wheel is built from: a file it needs from elsewhere is missed here
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "tucka_llm", source / "tucka_llm", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", root / "dist", source], cwd=root)
    (wheel,) = (root / "dist").glob("tucka_llm-*.whl")
    env = root / "env"
    run([sys.executable, "-m", "venv", "--without-pip", env], cwd=root)
    python = env / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=root)
    return env


def test_the_wheel_runs_every_stage_through_the_tucka_command(installed, tiny_model, tmp_path):
    tucka, python = installed / "bin" / "tucka", installed / "bin" / "python"
    where = run([python, "-c", "import tucka_llm; print(tucka_llm.__file__)"], tmp_path).stdout
    assert where.startswith(str(installed)), where  # the wheel's package, not the checkout's
    assert "export" in run([tucka, "--help"], tmp_path).stdout

    # 2 ranks, started as the README says: deepspeed --num_gpus 2 $(which tucka) train --ds zero2 ...
    deepspeed = [python, "-m", "deepspeed.launcher.runner", "--num_gpus", 2, "--master_port", free_port()]
    train = ["train", "--ds", "zero2", "--model", tiny_model, "--data", "gsm8k-train", "--num-examples", 8,
             "--max-steps", 2, "--micro-batch", 2, "--global-batch", 4, "--max-len", 128, "--precision", "fp32",
             "--r", 4, "--k", 2, "--dai-samples", 4, "--logging-steps", 1, "--output", "run"]  # fmt: skip
    run([*deepspeed, tucka, *train], tmp_path)
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert recorded["world_size"] == 2
    assert Path(recorded["options"]["ds"]).is_relative_to(installed)  # the config shipped in the wheel
    assert recorded["versions"]["tucka_llm"] == run([python, "-c", "import tucka_llm; print(tucka_llm.__version__)"],
                                                     tmp_path).stdout.strip()  # fmt: skip

    run([tucka, "export", "--adapter", "run", "--out", "merged", "--dtype", "float32"], tmp_path)
    run([tucka, "export", "--adapter", "run", "--out", "routed", "--format", "lora"], tmp_path)
    assert (tmp_path / "routed" / "manifest.json").is_file()
    evaluate = ["eval", "gsm8k", "--model", "merged", "--limit", 2, "--max-new-tokens", 4, "--backend", "hf"]
    run([tucka, *evaluate, "--output", "eval"], tmp_path)
    run([tucka, "loss", "--model", "merged", "--limit", 2, "--output", "eval"], tmp_path)
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["n"] == 2
    assert json.loads((tmp_path / "eval" / "held_out_loss.json").read_text())["problems"] == 2

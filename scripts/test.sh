#!/usr/bin/env bash
# The test command: lint, the quick tests, then the real-engine and slow ones (vLLM, DeepSpeed).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/mypy  # shared/ and the losses (pyproject.toml: tool.mypy)
.venv/bin/python -m pytest -q
.venv/bin/python -m pytest -q -m "engine or slow"

#!/usr/bin/env bash
# Install the package with its test extras and run the test suite (what CI runs).
# torch==2.13.0 is pinned in the same pip command so pip takes the CPU wheel, not CUDA builds.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
python -m pip install -q torch==2.13.0 -e ".[dev]"
# The PyTorch Phi-3.5-V reference model (VLM2Vec's copy). Its metadata pins an old torch and Python
# that its modeling code does not need, hence --no-deps; it needs transformers 4.57 (pinned in dev).
python -m pip install -q --no-deps --ignore-requires-python vlm2vec-for-pyserini==0.2.0
ruff check .
# The Phi-3.5-V reference processor needs torchvision, which does not import beside torch 2.13.0:
# it runs in its own venv (.venv-ref, torch 2.14.1 + torchvision 0.29.1 from local disk).
export UNIME_REFERENCE_PYTHON="${UNIME_REFERENCE_PYTHON:-$(bash scripts/reference_env.sh)}"
python -m pytest "$@"

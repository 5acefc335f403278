#!/usr/bin/env bash
# Install the package with its test extras and run the test suite (what CI runs).
# torch==2.13.0 is pinned in the same pip command so pip takes the CPU wheel, not CUDA builds.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
python -m pip install -q torch==2.13.0 -e ".[dev]"
ruff check .
python -m pytest "$@"

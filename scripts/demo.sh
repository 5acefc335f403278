#!/usr/bin/env bash
# Install unime-jax (CPU) and run the main job on the embedded demo config.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
python -m pip install -q torch==2.13.0 -e ".[torch]"
python -m unime_jax.train --config configs/demo.yaml "$@"

#!/usr/bin/env bash
# Create ./.venv-ref: a separate interpreter with the PyTorch reference stack that does not install
# beside the main test env's torch==2.13.0 (torchvision, which VLM2Vec's Phi-3.5-V image processor
# imports, needs a matching torch). The parity tests run the references in it through a subprocess
# (tests/reference_phi3v_processor.py, and tests/reference_mmeb_parsers.py for MMEB-V2's eval parsers,
# which import HF datasets); point them at it with UNIME_REFERENCE_PYTHON=.venv-ref/bin/python.
# Idempotent: an existing env whose imports work is left as it is. Prints the interpreter's path, and
# only that, on stdout (progress goes to stderr), for UNIME_REFERENCE_PYTHON="$(bash scripts/reference_env.sh)".
set -euo pipefail
cd "$(dirname "$0")/.."
ref_python="$PWD/.venv-ref/bin/python"
if ! "$ref_python" -c "import torchvision, transformers, datasets, vlm2vec_for_pyserini" >/dev/null 2>&1; then
  echo "reference_env.sh: installing the reference env in .venv-ref" >&2
  python3 -m venv .venv-ref
  # huggingface-hub<1.0: transformers 4.57 refuses newer hubs, which current datasets would pull in.
  "$ref_python" -m pip install -q torch==2.14.1 torchvision==0.29.1 transformers==4.57.6 pillow numpy \
    datasets "huggingface-hub>=0.34,<1.0" >&2
  # Its declared requirements pin another torch and Python; the processor needs only the above.
  "$ref_python" -m pip install -q --no-deps --ignore-requires-python vlm2vec-for-pyserini==0.2.0 >&2
  "$ref_python" -c "import torchvision, transformers, datasets, vlm2vec_for_pyserini"
fi
echo "$ref_python"

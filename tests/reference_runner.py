"""Run tests/reference_phi3v_processor.py in the reference interpreter (``UNIME_REFERENCE_PYTHON``).

That interpreter (``bash scripts/reference_env.sh``) holds torch 2.14.1 + torchvision, which do not
install beside the main test env's torch; the tests talk to it through a JSON spec and a .npz file.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

REFERENCE_SCRIPT = Path(__file__).with_name("reference_phi3v_processor.py")


def run_reference(spec: dict, directory: Path) -> dict[str, np.ndarray]:
    """The script's arrays for `spec`, computed in `directory`; skips when no reference interpreter is set."""
    python = os.environ.get("UNIME_REFERENCE_PYTHON")
    if not python:
        pytest.skip(
            "UNIME_REFERENCE_PYTHON is unset: run `bash scripts/reference_env.sh` and set "
            "UNIME_REFERENCE_PYTHON to the interpreter it prints (scripts/test.sh does both)"
        )
    output = directory / "reference.npz"
    # -I: the reference env's own site-packages only, whatever PYTHONPATH this process has.
    result = subprocess.run(
        [python, "-I", str(REFERENCE_SCRIPT), str(output)],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"the reference script failed under {python} (exit {result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}"
        )
    with np.load(output) as data:
        return {key: data[key] for key in data.files}

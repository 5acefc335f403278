"""Run a reference script (tests/reference_*.py) in the reference interpreter (``UNIME_REFERENCE_PYTHON``).

That interpreter (``bash scripts/reference_env.sh``) holds torch 2.14.1 + torchvision, which do not
install beside the main test env's torch, and HF datasets; the tests talk to it through a JSON spec
on stdin and an output file (.npz or .json).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers.tokenizers import phi_tokenizer

TESTS = Path(__file__).resolve().parents[1]
REFERENCE_SCRIPT = TESTS / "reference_phi3v_processor.py"
PARSERS_SCRIPT = TESTS / "reference_mmeb_parsers.py"


def run_reference(spec: dict, directory: Path) -> dict[str, np.ndarray]:
    """The Phi-3.5-V processor script's arrays for `spec`, computed in `directory`."""
    output = _run(REFERENCE_SCRIPT, spec, directory / "reference.npz")
    with np.load(output) as data:
        return {key: data[key] for key in data.files}


def run_reference_json(script: Path, spec: dict, directory: Path) -> object:
    """A reference script's JSON output for `spec`."""
    return json.loads(_run(script, spec, directory / f"{script.stem}.json").read_text(encoding="utf-8"))


def _run(script: Path, spec: dict, output: Path) -> Path:
    """Run `script` on `spec`, writing `output`; skips when no reference interpreter is set."""
    python = os.environ.get("UNIME_REFERENCE_PYTHON")
    if not python:
        pytest.skip(
            "UNIME_REFERENCE_PYTHON is unset: run `bash scripts/reference_env.sh` and set "
            "UNIME_REFERENCE_PYTHON to the interpreter it prints (scripts/test.sh does both)"
        )
    # -I: the reference env's own site-packages only, whatever PYTHONPATH this process has.
    result = subprocess.run(
        [python, "-I", str(script), str(output)],
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
    return output


def reference_phi3v_ids(cases: list[tuple[str, list[int]]], directory: Path) -> list[list[int]]:
    """VLM2Vec's `Phi3VProcessor._convert_images_texts_to_inputs` ids for (prompt, image token counts)
    cases, run unmodified (real torchvision) in the reference interpreter with `phi_tokenizer()`."""
    phi_tokenizer().save_pretrained(directory / "tokenizer")
    spec = {
        "id_cases": {"tokenizer": str(directory / "tokenizer"), "cases": [[p, list(n)] for p, n in cases]}
    }
    arrays = run_reference(spec, directory)
    return [arrays[f"ids_{index}"].tolist() for index in range(len(cases))]

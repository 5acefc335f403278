"""Safetensors directories read back, and compared bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import safe_open


def tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def assert_bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), key

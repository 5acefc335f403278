"""Lazy reading of HF safetensors directories (single file or sharded with an index) and sharded writing."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class TensorSource(Protocol):
    """HF-named tensors that can be listed with their shapes and read one at a time."""

    shapes: dict[str, tuple[int, ...]]

    def get(self, key: str) -> np.ndarray: ...

    def float_dtype(self) -> str: ...


def _majority_float(dtype_names: Iterable[str]) -> str:
    names = [n for n in dtype_names if n in _FLOAT_DTYPES.values()]
    return max(set(names), key=names.count) if names else "float32"


class ArrayDict:
    """An in-memory state dict (e.g. from a live PyTorch model) as a tensor source."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = arrays
        self.shapes = {k: tuple(v.shape) for k, v in arrays.items()}

    def get(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def float_dtype(self) -> str:
        return _majority_float(str(np.dtype(v.dtype)) for v in self.arrays.values())


class SafetensorsDir:
    """Key -> file index over an HF model directory; tensors are read one at a time, on demand."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        self.files = self._files()
        self.key_file: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for file in self.files:
            try:
                with safe_open(file, framework="numpy") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                        header = f.get_slice(key)
                        self.key_file[key] = file
                        self.shapes[key] = tuple(header.get_shape())
                        self.dtypes[key] = header.get_dtype()
            except SafetensorError as e:  # a truncated or damaged file: name it
                raise ValueError(f"{file} is not a readable safetensors file ({e}); download or save it again") from e

    def _files(self) -> list[Path]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index} is not a valid safetensors index ({e!r}); download it again") from e
            missing = [n for n in names if not (self.dir / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shard files that do not exist: {missing}")
            return [self.dir / n for n in names]
        if (self.dir / SINGLE_FILE).is_file():
            return [self.dir / SINGLE_FILE]
        found = sorted(self.dir.glob("*.safetensors"))
        if not found:
            raise FileNotFoundError(
                f"no safetensors weights in {self.dir}: expected {SINGLE_FILE} or {INDEX_FILE} "
                "(PyTorch .bin checkpoints must be re-saved with save_pretrained(safe_serialization=True))"
            )
        return found

    def float_dtype(self) -> str:
        """The floating dtype most tensors are stored in (float32 if there are none)."""
        return _majority_float(_FLOAT_DTYPES.get(d, d) for d in self.dtypes.values())

    def get(self, key: str) -> np.ndarray:
        file = self.key_file[key]
        try:
            with safe_open(file, framework="numpy") as f:
                return f.get_tensor(key)
        except SafetensorError as e:
            raise ValueError(f"cannot read tensor {key} from {file} ({e}); download or save it again") from e


def parse_size(text: str) -> int:
    """'5GB', '200MB', '1024' -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, mult in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * mult)
    if upper.isdigit():
        return int(upper)
    raise ValueError(f"cannot read size {text!r}; use e.g. 5GB, 500MB or a byte count")


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Group keys, in order, into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_shard(path: Path, tensors: dict[str, np.ndarray]) -> None:
    # "format": "pt" is what transformers checks before loading a safetensors file.
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_index(out: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))

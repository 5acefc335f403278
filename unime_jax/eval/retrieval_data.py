"""UniME's zero-shot retrieval sets, read in the form their public sources ship them.

- **Flickr30K** (``royokong/flickr30k_test``, 1K images / 5K captions) and **COCO**
  (``royokong/coco_test``, 5K / 25K, the first 5 captions of each image kept): the HF dataset
  download, parquet files (anywhere under the directory, in path order) with an ``image`` column
  (``{"bytes", "path"}``) and a ``text`` (or ``caption``) list column.
- **ShareGPT4V**: ``share-captioner_coco_lcs_sam_1246k_1107.json``; its first 1000 records, the
  caption ``conversations[1].value`` with newlines turned into spaces, images relative to an
  image root (Long-CLIP's protocol).
- **Urban1K** (Long-CLIP's ``Urban1k``): ``image/<name>.jpg`` and ``caption/<name>.txt``; the
  caption is the file's first line exactly as ``readlines()`` returns it, as UniME's script reads it.
- **SugarCrepe**: ``<subset>.json`` (``{id: {"filename", "caption", "negative_caption"}}``) for
  its 7 subsets, images from COCO ``val2017``.
- **Pairs** (your own data): JSON lines ``{"image": path, "captions": [str, ...]}``.

Relative image paths resolve against the given image root. A record that cannot be read is left
out and reported (``bad``); missing image files are found when they are embedded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from unime_jax.data.errors import DataError

__all__ = [
    "SUGARCREPE_GROUPS",
    "SUGARCREPE_SUBSETS",
    "ImageRef",
    "Pairs",
    "SugarCrepeSubset",
    "read_hf_parquet",
    "read_pairs_jsonl",
    "read_sharegpt4v",
    "read_sugarcrepe",
    "read_urban1k",
]

SUGARCREPE_SUBSETS = (
    "replace_obj",
    "replace_att",
    "replace_rel",
    "swap_obj",
    "swap_att",
    "add_obj",
    "add_att",
)
# The paper's group means (UniME-v2's eval_sugar_crepe.py).
SUGARCREPE_GROUPS = {
    "replace": ("replace_obj", "replace_att", "replace_rel"),
    "swap": ("swap_obj", "swap_att"),
    "add": ("add_obj", "add_att"),
}

ImageRef = Path | Callable[[], bytes]  # a file, or a function returning the encoded file's bytes


@dataclass
class Pairs:
    """Images and captions; ``caption_image[j]`` is the image caption j describes."""

    name: str
    images: list[ImageRef] = field(default_factory=list)
    image_names: list[str] = field(default_factory=list)  # where each image came from, for reports
    captions: list[str] = field(default_factory=list)
    caption_image: list[int] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)

    def add(self, image: ImageRef, name: str, captions: list[str]) -> None:
        self.images.append(image)
        self.image_names.append(name)
        self.captions += captions
        self.caption_image += [len(self.images) - 1] * len(captions)


@dataclass
class SugarCrepeSubset:
    name: str
    images: list[Path] = field(default_factory=list)
    positives: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)


def _json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"{path} does not exist") from e
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def _texts(value: Any) -> list[str] | None:
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return value
    return None


def _parquet_image(column: pa.ChunkedArray, row: int, base: Path) -> ImageRef | None:
    value = column[row].as_py()
    if isinstance(value, dict) and value.get("bytes"):
        return lambda: column[row].as_py()["bytes"]
    if isinstance(value, dict) and value.get("path"):
        return base / value["path"]
    return None


def read_hf_parquet(root: Path, name: str, max_captions: int | None = None) -> Pairs:
    """Flickr30K / COCO as their HF test sets download: ``image`` and ``text`` (list) columns."""
    files = sorted(Path(root).rglob("*.parquet"))
    if not files:
        raise DataError(f"no .parquet files under {root}; expected the HF download of {name}'s test set")
    pairs = Pairs(name)
    for file in files:
        try:
            table = pq.read_table(file, memory_map=True)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"cannot read {file}: {e}") from e
        text_column = next((c for c in ("text", "caption") if c in table.column_names), None)
        if "image" not in table.column_names or text_column is None:
            raise DataError(
                f"{file} needs an 'image' and a 'text' column, has {', '.join(table.column_names)}"
            )
        images, texts = table.column("image"), table.column(text_column).to_pylist()
        for row, value in enumerate(texts):
            image, captions = _parquet_image(images, row, file.parent), _texts(value)
            if image is None or captions is None:
                pairs.bad.append(f"{file} row {row}: needs image bytes (or a path) and a list of captions")
                continue
            pairs.add(image, f"{file.name} row {row}", captions[:max_captions])
    return pairs


def read_sharegpt4v(json_file: Path, image_root: Path, limit: int = 1000) -> Pairs:
    """ShareGPT4V's first ``limit`` records: caption = conversations[1].value, newlines as spaces."""
    records = _json(json_file)
    if not isinstance(records, list):
        raise DataError(f"{json_file} must hold a JSON list of ShareGPT4V records")
    pairs = Pairs("sharegpt4v")
    for index, record in enumerate(records[:limit]):
        try:
            caption = record["conversations"][1]["value"].replace("\n", " ")
            image = Path(image_root) / record["image"]
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            pairs.bad.append(f"{json_file} record {index}: no image or conversations[1].value ({e!r})")
            continue
        pairs.add(image, record["image"], [caption])
    return pairs


def read_urban1k(root: Path) -> Pairs:
    """Urban1K: every ``caption/<name>.txt`` (its first line) with ``image/<name>.jpg``."""
    captions = sorted((Path(root) / "caption").glob("*.txt"))
    if not captions:
        raise DataError(f"no caption/*.txt files in {root}; expected Long-CLIP's Urban1k layout")
    pairs = Pairs("urban1k")
    for path in captions:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        if not lines or not lines[0].strip():
            pairs.bad.append(f"{path}: empty caption")
            continue
        pairs.add(Path(root) / "image" / f"{path.stem}.jpg", path.stem, [lines[0]])
    return pairs


def read_pairs_jsonl(path: Path, image_root: Path | None = None, name: str | None = None) -> Pairs:
    """Pairs from JSON lines ``{"image": path, "captions": [...]}``; paths relative to ``image_root``
    (default: the file's directory)."""
    root = Path(image_root) if image_root is not None else Path(path).parent
    pairs = Pairs(name or Path(path).stem)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            pairs.bad.append(f"{path}:{number}: not valid JSON ({e})")
            continue
        captions = _texts(record.get("captions")) if isinstance(record, dict) else None
        image = record.get("image") if isinstance(record, dict) else None
        if not isinstance(image, str) or not image or captions is None:
            pairs.bad.append(f'{path}:{number}: expected {{"image": path, "captions": [non-empty strings]}}')
            continue
        pairs.add(root / image, f"{path.name}:{number}", captions)
    if not pairs.images:
        raise DataError(
            f"{path} holds no usable pairs" + (f"; first problem: {pairs.bad[0]}" if pairs.bad else "")
        )
    return pairs


def read_sugarcrepe(root: Path, image_root: Path) -> list[SugarCrepeSubset]:
    """The 7 SugarCrepe subsets (``root/<subset>.json``), images under ``image_root`` (COCO val2017)."""
    subsets = []
    for name in SUGARCREPE_SUBSETS:
        records = _json(Path(root) / f"{name}.json")
        if not isinstance(records, dict):
            raise DataError(f"{Path(root) / name}.json must hold a JSON object of records")
        subset = SugarCrepeSubset(name)
        for key, record in records.items():
            try:
                image, positive, negative = record["filename"], record["caption"], record["negative_caption"]
            except (KeyError, TypeError) as e:
                subset.bad.append(f"{root}/{name}.json record {key}: missing {e}")
                continue
            subset.images.append(Path(image_root) / image)
            subset.positives.append(positive)
            subset.negatives.append(negative)
        subsets.append(subset)
    return subsets

"""Reading MMEB-eval as its download ships it: one query and its own candidate list per row.

Layouts (one directory per dataset, ``ROOT/<Dataset>/test-*.parquet``, files in name order):

- **V1** (``TIGER-Lab/MMEB-eval``): ``qry_text`` (str), ``qry_img_path`` (str, "" = no image),
  ``tgt_text`` (list[str]), ``tgt_img_path`` (list[str]). The strings are what is embedded.
- **V2 instruct** (``ziyjiang/MMEB_Test_Instruct``): the same plus ``qry_inst``/``tgt_inst``, the
  instructions kept apart from the texts. The V1 strings are rebuilt from them the way MMEB-V2's
  own image parsers do ("to stay consistent with v1 eval"; VLM2Vec ``src/data/eval_dataset/
  image_*.py``), per dataset kind (:data:`unime_jax.eval.mmeb_tasks.MMEB_DATASETS`).

Candidate 0 of every row is the positive. Texts keep MMEB's Phi-3 ``<|image_1|>``; the backbone's
featurizer maps it to its own image token. Image paths stay relative (to ``--image-root``).

A malformed row (a null text, candidate lists of different lengths, an empty side) is kept out of
the rows and reported with its file and row; it counts as not scored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from unime_jax.data.errors import DataError
from unime_jax.eval.mmeb_tasks import Parser, task
from unime_jax.processing.prompts import IMAGE_TAG

__all__ = [
    "V1_COLUMNS",
    "V2_COLUMNS",
    "BadRow",
    "Item",
    "MmebDataset",
    "Row",
    "dataset_files",
    "read_dataset",
]

V1_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
V2_COLUMNS = ("qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path")


@dataclass(frozen=True, order=True)
class Item:
    """One thing to embed: the exact text and an image path relative to the image root ("" = none).

    Equal items are embedded once per dataset, as VLM2Vec's ``(text, img_path)`` keys are.
    """

    text: str
    image: str


@dataclass(frozen=True)
class Row:
    index: int  # position in the dataset, over its files in order (the line of <Dataset>_pred.jsonl)
    file: str
    file_row: int
    query: Item
    candidates: tuple[Item, ...]  # candidates[0] is the positive


@dataclass(frozen=True)
class BadRow:
    index: int
    file: str
    file_row: int
    reason: str

    def describe(self) -> str:
        return f"{self.file} row {self.file_row}: {self.reason}"


@dataclass
class MmebDataset:
    name: str
    layout: str  # "v1" or "v2"
    files: list[Path]
    num_rows: int
    rows: list[Row] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)
    sha256: str = ""  # of the parquet files' bytes, in order

    def items(self) -> list[Item]:
        """Every distinct item of the queries and candidates, in a fixed order: text-only items
        first, each group by text length, so that encoding chunks hold similar inputs."""
        unique = {row.query for row in self.rows}
        for row in self.rows:
            unique.update(row.candidates)
        return sorted(unique, key=lambda item: (bool(item.image), len(item.text), item))


def dataset_files(root: Path, name: str) -> list[Path]:
    return sorted((Path(root) / name).glob("test-*.parquet"))


class _Malformed(ValueError):
    pass


def _string(value: Any, column: str, *, nullable: bool = False) -> str:
    if value is None and nullable:
        return ""
    if not isinstance(value, str):
        raise _Malformed(f"{column} must be a string, got {value!r}")
    return value


def _strings(value: Any, column: str, *, nullable: bool = False) -> list[str]:
    if not isinstance(value, list) or not value:
        raise _Malformed(f"{column} must be a non-empty list, got {value!r}")
    return [_string(v, f"{column}[{i}]", nullable=nullable) for i, v in enumerate(value)]


def _pair(texts: list[str], images: list[str]) -> tuple[Item, ...]:
    if len(texts) != len(images):
        raise _Malformed(f"tgt_text has {len(texts)} candidates but tgt_img_path has {len(images)}")
    return tuple(Item(t, i) for t, i in zip(texts, images, strict=True))


def _v1_row(record: dict[str, Any]) -> tuple[Item, tuple[Item, ...]]:
    query = Item(
        _string(record["qry_text"], "qry_text"),
        _string(record["qry_img_path"], "qry_img_path", nullable=True),
    )
    texts = _strings(record["tgt_text"], "tgt_text")
    images = record["tgt_img_path"]
    paths = [""] * len(texts) if images is None else _strings(images, "tgt_img_path", nullable=True)
    return query, _pair(texts, paths)


# --- MMEB-V2 instruct layout -> V1 strings --------------------------------------------------------
# VLM2Vec's process_input_text(inst, "phi3_v", text, add_image_token=True) writes
# "<|image_1|> " + inst (+ " " + text); the parsers then turn " \n" into "\n" and append "\n".


def _with_image(prompt: str) -> str:
    return (f"{IMAGE_TAG} {prompt}").replace(" \n", "\n")


def _image_query(parser: Parser, inst: str, text: str) -> str:
    inst = inst.replace(IMAGE_TAG, "")
    if parser in ("image_qa", "image_i2i_vg"):
        inst = "\n" + inst.strip()
    return _with_image(inst + (f" {text}" if text else "")) + "\n"


def _image_candidates(parser: Parser, inst: str, captions: list[str]) -> list[str]:
    inst = inst.replace(IMAGE_TAG, "")
    if captions[0].strip():  # WebQA, EDIS, RefCOCO-Matching: the instruction plus each candidate's text
        return [_with_image(f"{inst} {caption}") + "\n" for caption in captions]
    # t2i targets end with a newline in V1, grounding/i2i targets do not.
    return [_with_image(inst) + ("\n" if parser == "image_t2i" else "")] * len(captions)


def _v2_row(record: dict[str, Any], parser: Parser, name: str) -> tuple[Item, tuple[Item, ...]]:
    qry_inst = _string(record["qry_inst"], "qry_inst")
    qry_text = _string(record["qry_text"], "qry_text", nullable=True)
    tgt_text = _strings(record["tgt_text"], "tgt_text", nullable=True)
    if parser == "image_t2i":  # text queries: the instruction keeps its placeholder, no query image
        query = Item(f"{qry_inst} {qry_text}\n" + ("\n" if name == "VisDial" else ""), "")
    else:
        query = Item(
            _image_query(parser, qry_inst, qry_text), _string(record["qry_img_path"], "qry_img_path")
        )
    if parser in ("image_cls", "image_qa", "image_i2t"):  # text candidates, as written
        return query, _pair(tgt_text, [""] * len(tgt_text))
    texts = _image_candidates(parser, _string(record["tgt_inst"], "tgt_inst"), tgt_text)
    return query, _pair(texts, _strings(record["tgt_img_path"], "tgt_img_path"))


def _layout(file: Path) -> str:
    try:
        names = set(pq.read_schema(file).names)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read MMEB parquet file {file}: {e}") from e
    if set(V2_COLUMNS) <= names:
        return "v2"
    if set(V1_COLUMNS) <= names:
        return "v1"
    missing = ", ".join(c for c in V1_COLUMNS if c not in names)
    raise DataError(
        f"{file} lacks column(s) {missing} of the MMEB-eval layout (has {', '.join(sorted(names))})"
    )


def _records(file: Path, columns: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    try:
        table = pq.read_table(file, columns=list(columns))
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read MMEB parquet file {file}: {e}") from e
    yield from table.to_pylist()


def _digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_dataset(root: Path, name: str) -> MmebDataset:
    """Rows of ``root/name/test-*.parquet``; malformed rows go to ``bad``."""
    files = dataset_files(root, name)
    if not files:
        raise DataError(f"no test-*.parquet files in {Path(root) / name}; is --data the MMEB-eval root?")
    layouts = {_layout(f) for f in files}
    if len(layouts) > 1:
        raise DataError(f"{Path(root) / name}: files mix the V1 and V2 layouts")
    layout = layouts.pop()
    known = task(name)
    if layout == "v2" and known is None:
        raise DataError(
            f"{Path(root) / name} is in the MMEB-V2 instruct layout, whose V1 strings are rebuilt per "
            f"MMEB dataset; {name!r} is not one of the 36 (convert it to the V1 columns {', '.join(V1_COLUMNS)})"
        )
    dataset = MmebDataset(name, layout, files, 0, sha256=_digest(files))
    for file in files:
        for file_row, record in enumerate(_records(file, V2_COLUMNS if layout == "v2" else V1_COLUMNS)):
            index = dataset.num_rows
            dataset.num_rows += 1
            try:
                query, candidates = _v1_row(record) if layout == "v1" else _v2_row(record, known.parser, name)
                for position, item in enumerate((query, *candidates)):
                    if not item.text and not item.image:
                        side = "the query" if position == 0 else f"candidate {position - 1}"
                        raise _Malformed(f"{side} has neither a text nor an image")
            except _Malformed as e:
                dataset.bad.append(BadRow(index, str(file), file_row, str(e)))
                continue
            dataset.rows.append(Row(index, str(file), file_row, query, candidates))
    return dataset

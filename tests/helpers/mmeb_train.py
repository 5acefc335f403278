"""MMEB-train subsets in the download's layout: ``<root>/<Subset>/<split>-00000-of-00001.parquet``."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")


def write_subset(
    root: Path, subset: str, rows: list[tuple[str, str, str, str]], split: str = "original"
) -> None:
    """One subset's parquet file; each row is (qry, qry_image_path, pos_text, pos_image_path)."""
    columns = dict(zip(COLUMNS, zip(*rows, strict=True), strict=True))
    (root / subset).mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({k: list(v) for k, v in columns.items()}), root / subset / f"{split}-00000-of-00001.parquet"
    )

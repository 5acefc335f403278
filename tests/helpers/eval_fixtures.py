"""Builders for the evaluation tests: tiny MMEB-eval datasets in the real parquet layouts, and the
protocol computed independently with transformers and numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE_TARGET = "<|image_1|>\nRepresent the given image.\n"
# (height, width, mode): anyres grids 2x2, 1x2, 3x1 and 2x2 uncut; grey, palette and RGBA files too.
_POOL = [(30, 40, "RGB"), (28, 28, "L"), (90, 20, "RGB"), (61, 57, "P"), (40, 40, "RGBA"), (28, 56, "RGB")]


def write_images(root: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` random images under ``root/images``; their paths relative to ``root``."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        height, width, mode = _POOL[i % len(_POOL)]
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        image = image.convert(mode) if mode != "P" else image.quantize(16)
        paths.append(f"images/{i:03d}.png")
        image.save(root / paths[-1])
    return paths


def write_parquet(root: Path, name: str, rows: list[dict], files: int = 1) -> None:
    """``root/name/test-0000k-of-0000n.parquet``, the rows split over ``files`` files."""
    (root / name).mkdir(parents=True, exist_ok=True)
    step = -(-len(rows) // files)
    for k in range(files):
        table = pa.Table.from_pylist(rows[k * step : (k + 1) * step])
        pq.write_table(table, root / name / f"test-{k:05d}-of-{files:05d}.parquet")


def write_mmeb_v1(root: Path) -> dict[str, list[dict]]:
    """Four small datasets in the MMEB-eval V1 layout, one per kind of row; returns their rows."""
    images = write_images(root, 12)
    labels = ["dog", "cat", "car", "tree", "boat"]
    datasets = {
        # text query -> image candidates; the last row's candidates are one image thrice (a tie)
        "MSCOCO_t2i": [
            {
                "qry_text": f"Find me an everyday image that matches the given caption: a photo number {i}\n",
                "qry_img_path": "",
                "tgt_text": [IMAGE_TARGET] * 5,
                "tgt_img_path": [images[(3 * i + j) % 12] for j in range(5)],
            }
            for i in range(6)
        ]
        + [
            {
                "qry_text": "Find me an everyday image: tie\n",
                "qry_img_path": "",
                "tgt_text": [IMAGE_TARGET] * 3,
                "tgt_img_path": [images[1]] * 3,
            }
        ],
        # image query -> text labels
        "VOC2007": [
            {
                "qry_text": "<|image_1|>\nIdentify the object shown in the image\n",
                "qry_img_path": images[i],
                "tgt_text": [labels[(i + j) % 5] for j in range(5)],
                "tgt_img_path": [""] * 5,
            }
            for i in range(7)
        ],
        # a text query that holds the placeholder without an image -> image+text candidates
        "WebQA": [
            {
                "qry_text": f"<|image_1|>\nFind a Wikipedia image that answers this question: question {i}?\n",
                "qry_img_path": "",
                "tgt_text": [
                    f"<|image_1|>\nRepresent the given Wikipedia image with related text information: page {i + j}\n"
                    for j in range(4)
                ],
                "tgt_img_path": [images[(i + 2 * j) % 12] for j in range(4)],
            }
            for i in range(4)
        ],
        # image query -> image candidates, rows split over two files
        "NIGHTS": [
            {
                "qry_text": "<|image_1|>\nFind a day-to-day image that looks similar to the provided image.\n",
                "qry_img_path": images[i],
                "tgt_text": ["<|image_1|>\nRepresent the given image.\n"] * 4,
                "tgt_img_path": [images[(i + 5 * j + 1) % 12] for j in range(4)],
            }
            for i in range(5)
        ],
    }
    for name, rows in datasets.items():
        write_parquet(root, name, rows, files=2 if name == "NIGHTS" else 1)
    return datasets


def reference_predictions(
    reference, root: Path, rows: list[dict], image_size: int | None = None
) -> tuple[list[int], float]:
    """VLM2Vec's protocol with transformers (``reference.embed``) and numpy: per-row argmax, and the
    smallest margin between a row's best candidate and its best *different* candidate."""
    cache: dict[tuple[str, str], np.ndarray] = {}

    def embed(text: str, path: str) -> np.ndarray:
        if (text, path) not in cache:
            image = None
            if path:
                image = Image.open(root / path)
                if image_size:
                    image = image.resize((image_size, image_size))
            cache[text, path] = reference.embed(text.replace("<|image_1|>", "<image>"), image)
        return cache[text, path]

    preds, margin = [], np.inf
    for row in rows:
        query = embed(row["qry_text"], row["qry_img_path"])
        keys = list(zip(row["tgt_text"], row["tgt_img_path"], strict=True))
        candidates = np.stack([embed(*key) for key in keys]).astype(np.float64)
        scores = candidates @ query / (np.linalg.norm(candidates, axis=1) * np.linalg.norm(query))
        best = int(np.argmax(scores))
        preds.append(best)
        others = [s for key, s in zip(keys, scores, strict=True) if key != keys[best]]
        if others:
            margin = min(margin, scores[best] - max(others))
    return preds, float(margin)


def read_preds(path: Path) -> list[int | None]:
    return [json.loads(line)["pred"] for line in path.read_text(encoding="utf-8").splitlines()]

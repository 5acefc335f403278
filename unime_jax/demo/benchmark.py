"""The demo's held-out scenes as a small benchmark in the real formats, scored through the harness.

Layout under ``root`` (written once per held-out set, reused while it matches)::

    mmeb/ShapesT2I/test-00000-of-00001.parquet   caption query -> image candidates
    mmeb/ShapesI2T/test-00000-of-00001.parquet   image query -> caption candidates
    mmeb/ShapesTwin/test-00000-of-00001.parquet  image query -> [its caption, its one-change twin]
    mmeb/images/000000.png ...            the held-out scenes (paths relative to mmeb/, as MMEB-eval's)
    pairs.jsonl                           {"image", "captions"}: one scene per distinct caption

The MMEB datasets use the strings stage 2 trains on (ShapesI2T/ShapesT2I's instructions), each row's
candidates being the positive first and then one item per *other* content: scenes whose captions
mean the same are neither positives nor negatives of each other. ``pairs.jsonl`` is scored with
UniME's zero-shot retrieval protocol (the E5-V "in one word" prompts). :func:`evaluate` runs
``python -m unime_jax.eval mmeb`` and ``retrieval``'s library functions on a model, so the demo's
numbers are computed by the same code as a published benchmark's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from unime_jax.demo.prepare import I2T_QUERY, IMAGE_TARGET, HeldOut, t2i_query
from unime_jax.eval.stats import wilson_interval
from unime_jax.eval.store import atomic_write_text

__all__ = ["DATASETS", "METRIC_DATASETS", "Benchmark", "evaluate", "paired_correct", "write_benchmark"]

DATASETS = ("ShapesT2I", "ShapesI2T", "ShapesTwin")
METRIC_DATASETS = {"t2i_r1": "ShapesT2I", "i2t_r1": "ShapesI2T", "compositional_acc": "ShapesTwin"}
_PARQUET = "test-00000-of-00001.parquet"
_MANIFEST = "benchmark.json"


@dataclass(frozen=True)
class Benchmark:
    root: Path
    twin_kinds: tuple[str, ...]  # per ShapesTwin row
    chance: dict[str, float]  # a random ranking's expected score, per metric

    @property
    def mmeb_root(self) -> Path:
        return self.root / "mmeb"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs.jsonl"


def _rows(held: HeldOut, paths: list[str]) -> dict[str, list[dict[str, Any]]]:
    ids = held.caption_ids.tolist()
    first = {}  # content id -> its first scene
    for i, content in enumerate(ids):
        first.setdefault(content, i)
    t2i, i2t, twin = [], [], []
    for i, (caption, content) in enumerate(zip(held.captions, ids, strict=True)):
        other_images = [paths[j] for j in range(len(paths)) if ids[j] != content]
        other_captions = [held.captions[j] for c, j in first.items() if c != content]
        t2i.append(
            {
                "qry_text": t2i_query(caption),
                "qry_img_path": "",
                "tgt_text": [IMAGE_TARGET] * (1 + len(other_images)),
                "tgt_img_path": [paths[i], *other_images],
            }
        )
        i2t.append(
            {
                "qry_text": I2T_QUERY,
                "qry_img_path": paths[i],
                "tgt_text": [caption, *other_captions],
                "tgt_img_path": [""] * (1 + len(other_captions)),
            }
        )
        twin.append({"qry_text": I2T_QUERY, "qry_img_path": paths[i], "tgt_text": [caption, held.twin_captions[i]],
                     "tgt_img_path": ["", ""]})  # fmt: skip
    return {"ShapesT2I": t2i, "ShapesI2T": i2t, "ShapesTwin": twin}


def _chance(datasets: dict[str, list[dict[str, Any]]], pairs: int) -> dict[str, float]:
    out = {metric: float(np.mean([1 / len(r["tgt_text"]) for r in datasets[name]]))
           for metric, name in METRIC_DATASETS.items()}  # fmt: skip
    return out | {"retrieval_t2i_r1": 1 / pairs, "retrieval_i2t_r1": 1 / pairs}


def write_benchmark(root: Path, held: HeldOut) -> Benchmark:
    """Write (or reuse) the held-out benchmark under ``root``; returns where it is and its chance levels."""
    root = Path(root)
    paths = [f"images/{i:06d}.png" for i in range(len(held.captions))]  # relative to mmeb/
    datasets = _rows(held, paths)
    ids = held.caption_ids.tolist()
    distinct = sorted({c: i for i, c in reversed(list(enumerate(ids)))}.values())  # first scene per content
    pairs = [json.dumps({"image": f"mmeb/{paths[i]}", "captions": [held.captions[i]]}) for i in distinct]
    digest = hashlib.sha256(json.dumps([datasets, pairs]).encode() + held.images.tobytes()).hexdigest()
    manifest = root / _MANIFEST
    if not (manifest.is_file() and json.loads(manifest.read_text(encoding="utf-8")).get("sha256") == digest):
        manifest.unlink(missing_ok=True)  # first out, last in: a run that dies midway rewrites it all
        (root / "mmeb" / "images").mkdir(parents=True, exist_ok=True)
        for path, pixels in zip(paths, held.images, strict=True):
            Image.fromarray(pixels).save(root / "mmeb" / path)
        for name, rows in datasets.items():
            (root / "mmeb" / name).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), root / "mmeb" / name / _PARQUET)
        atomic_write_text(root / "pairs.jsonl", "\n".join(pairs) + "\n")
        atomic_write_text(manifest, json.dumps({"sha256": digest}) + "\n")
    return Benchmark(root, tuple(held.twin_kinds), _chance(datasets, len(pairs)))


def _correct(out: Path, name: str) -> list[bool]:
    lines = (out / f"{name}_pred.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["pred"] == 0 for line in lines]


def evaluate(embedder: Any, bench: Benchmark, out: Path, label: str, batch_size: int = 64) -> dict[str, Any]:
    """Score a model on the benchmark into ``out`` (``mmeb/`` and ``retrieval/``, the CLIs' outputs).

    Returns ``t2i_r1``, ``i2t_r1`` and ``compositional_acc`` (the MMEB datasets' precision@1),
    ``retrieval_t2i_r1``/``retrieval_i2t_r1`` (the pairs, E5-V prompts), each with a 95% Wilson
    interval (``<metric>_ci95``), ``compositional_acc/<twin kind>``, and the ``chance`` levels.
    A result already in ``out`` (a resumed run) is read back, not recomputed.
    """
    from unime_jax.eval.mmeb import run_mmeb
    from unime_jax.eval.retrieval_data import read_pairs_jsonl
    from unime_jax.eval.retrieval_suite import run_retrieval, write_retrieval_summary
    from unime_jax.eval.runs import EvalRun
    from unime_jax.eval.summary import write_summary

    settings = {"benchmark": "demo", "model": label, "benchmark_root": str(bench.root)}
    mmeb_out, retrieval_out = Path(out) / "mmeb", Path(out) / "retrieval"
    run = EvalRun(mmeb_out, settings, batch_size=batch_size, progress=False)
    scores = run_mmeb(embedder, run, bench.mmeb_root, bench.mmeb_root, DATASETS)
    write_summary(mmeb_out)
    pairs = read_pairs_jsonl(bench.pairs, name="pairs")
    retrieval = run_retrieval(
        embedder, EvalRun(retrieval_out, settings, batch_size=batch_size, progress=False), [pairs]
    )
    write_retrieval_summary(retrieval_out, retrieval)
    metrics: dict[str, Any] = {}
    for metric, name in METRIC_DATASETS.items():
        score = scores[name]
        metrics[metric] = score["acc"]
        metrics[f"{metric}_ci95"] = list(wilson_interval(score["num_correct"], score["num_pred"]))
    for direction in ("t2i", "i2t"):
        r1 = retrieval["pairs"][f"{direction}_r1"]
        total = retrieval["pairs"]["num_captions" if direction == "t2i" else "num_images"]
        metrics[f"retrieval_{direction}_r1"] = r1
        metrics[f"retrieval_{direction}_r1_ci95"] = list(wilson_interval(round(r1 * total), total))
    wins, kinds = _correct(mmeb_out, "ShapesTwin"), np.asarray(bench.twin_kinds)
    for kind in sorted(set(bench.twin_kinds)):
        metrics[f"compositional_acc/{kind}"] = float(np.mean(np.asarray(wins)[kinds == kind]))
    metrics["chance"] = dict(bench.chance)
    return metrics


def paired_correct(out: Path, metric: str) -> list[bool]:
    """Per-row correctness of one MMEB-format metric in an :func:`evaluate` output directory."""
    return _correct(Path(out) / "mmeb", METRIC_DATASETS[metric])

"""MMEB evaluation, VLM2Vec v1's protocol: embed every distinct (text, image) once, score each row's
own candidates by cosine, predict the argmax, report precision@1 per dataset.

Per dataset, in ``out``:

- ``<Dataset>_score.json``: ``{"acc", "num_correct", "num_pred"}`` (VLM2Vec's file), plus
  ``num_rows`` (rows in the data), ``num_skipped`` and ``num_tied`` (rows whose top score was shared
  by different items, decided by the tie rule); ``acc`` is over the ``num_pred`` scored rows.
- ``<Dataset>_pred.jsonl``: one ``{"pred": <candidate index>}`` per row, in input order; a row
  that could not be scored has ``{"pred": null, "error": ...}``.
- ``<Dataset>_skipped.jsonl``: the unscored rows with their file, row and reason (only if any).
- ``cache/<Dataset>/``: the embeddings while the dataset runs (a killed run resumes from them);
  removed once the score is written, unless ``keep_embeddings``.

A dataset whose score file exists is skipped, as VLM2Vec's ``eval.py`` does. ``run.json`` records
the model and settings; rerunning into the same ``out`` with other ones is refused.

Ties: ``np.argmax`` takes the first maximum, so a candidate tied with the positive (index 0)
counts as a hit, exactly as in VLM2Vec's ``get_pred``. A collapsed model (all embeddings equal)
would therefore score 100%; ``num_tied`` shows it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from unime_jax.embedder import UniME
from unime_jax.eval.encoding import Entry
from unime_jax.eval.mmeb_data import BadRow, Item, MmebDataset, read_dataset
from unime_jax.eval.runs import EvalRun
from unime_jax.eval.store import atomic_write_text

__all__ = ["predict", "run_mmeb"]


def predict(
    dataset: MmebDataset, index: dict[Item, int], embeddings: np.ndarray, errors: Sequence[str]
) -> tuple[dict[int, int], list[BadRow], int]:
    """Per scored row (by row index) the argmax candidate; the rows with a failed item, unscored; and
    how many rows had their top score tied between different items (the tie rule decided them)."""
    preds: dict[int, int] = {}
    skipped: list[BadRow] = []
    tied = 0
    for row in dataset.rows:
        ids = [index[row.query], *(index[c] for c in row.candidates)]
        failed = [(position, errors[i]) for position, i in enumerate(ids) if errors[i]]
        if failed:
            position, error = failed[0]
            side = "the query" if position == 0 else f"candidate {position - 1}"
            more = f" (and {len(failed) - 1} more item(s))" if len(failed) > 1 else ""
            skipped.append(BadRow(row.index, row.file, row.file_row, f"{side}: {error}{more}"))
            continue
        query = embeddings[ids[0]].astype(np.float64)
        candidates = embeddings[ids[1:]].astype(np.float64)
        scores = candidates @ query / (np.linalg.norm(candidates, axis=1) * np.linalg.norm(query))
        preds[row.index] = int(np.argmax(scores))  # the first maximum, as VLM2Vec's get_pred
        tied += len({ids[1 + i] for i in np.flatnonzero(scores == scores.max())}) > 1
    return preds, skipped, tied


def _items_digest(items: list[Item]) -> str:
    return hashlib.sha256(json.dumps([[i.text, i.image] for i in items]).encode()).hexdigest()


def _write_outputs(
    run: EvalRun, dataset: MmebDataset, preds: dict[int, int], skipped: list[BadRow], tied: int
) -> dict[str, Any]:
    unscored = {b.index: b for b in [*dataset.bad, *skipped]}
    lines = []
    correct = 0
    for i in range(dataset.num_rows):
        if i in unscored:
            lines.append(json.dumps({"pred": None, "error": unscored[i].reason}))
        else:
            lines.append(json.dumps({"pred": preds[i]}))
            correct += preds[i] == 0
    name = dataset.name
    atomic_write_text(run.out / f"{name}_pred.jsonl", "\n".join(lines) + "\n")
    if unscored:
        records = [
            {"row": b.index, "file": b.file, "file_row": b.file_row, "reason": b.reason}
            for b in sorted(unscored.values(), key=lambda b: b.index)
        ]
        atomic_write_text(run.out / f"{name}_skipped.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return {
        "acc": correct / len(preds) if preds else None,
        "num_correct": int(correct),
        "num_pred": len(preds),
        "num_rows": dataset.num_rows,
        "num_skipped": len(unscored),
        "num_tied": tied,
    }


def _report(name: str, score: dict[str, Any], dataset: MmebDataset, skipped: list[BadRow]) -> None:
    acc = "n/a" if score["acc"] is None else f"{100 * score['acc']:.1f}"
    print(f"{name}: precision@1 {acc} over {score['num_pred']}/{score['num_rows']} rows", file=sys.stderr)
    unscored = [*dataset.bad, *skipped]
    if unscored:
        print(
            f"{name}: {len(unscored)} row(s) not scored (listed in {name}_skipped.jsonl); first: "
            f"{unscored[0].describe()}",
            file=sys.stderr,
        )


def evaluate_dataset(
    model: UniME, run: EvalRun, data_root: Path, image_root: Path, name: str
) -> dict[str, Any] | None:
    """Score one dataset (or load its earlier score); None on processes other than 0."""
    done, score = run.earlier_score(name)
    if done:
        return score
    dataset = read_dataset(data_root, name)
    items = dataset.items()
    entries = [Entry(item.text or None, image_root / item.image if item.image else None) for item in items]
    identity = {"data_sha256": dataset.sha256, "items_sha256": _items_digest(items)}
    embeddings, errors = run.embed(model, name, entries, identity, raw=True)
    if jax.process_index() != 0:
        return None
    preds, skipped, tied = predict(dataset, {item: i for i, item in enumerate(items)}, embeddings, errors)
    score = _write_outputs(run, dataset, preds, skipped, tied)
    run.finish(name, score)
    _report(name, score, dataset, skipped)
    return score


def run_mmeb(
    model: UniME, run: EvalRun, data_root: Path, image_root: Path, datasets: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Evaluate ``datasets`` (directories of ``data_root``) in order; their scores, on process 0."""
    run.start()
    scores = {}
    for name in datasets:
        score = evaluate_dataset(model, run, data_root, image_root, name)
        if score is not None:
            scores[name] = score
    return scores

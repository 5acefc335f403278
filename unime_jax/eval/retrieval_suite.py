"""UniME's zero-shot retrieval suite: R@1/5/10 both ways, and SugarCrepe's pairwise accuracy.

Inputs are embedded with UniME's E5-V "in one word" templates (``UniME.encode``'s default: one for
a caption, one for an image), as UniME's ``self_evaluate`` scripts do for every model.

- **Recall@k** (UniME's hit@k): text→image, a caption's query is a hit when its image ranks in
  the top k; image→text, an image is a hit when *any* of its captions does. Text→image is reported
  first, as in the paper's v4. Ties are ranked against the gold (a constant model scores 0), where
  UniME's ``torch.topk`` breaks them arbitrarily; trained models do not produce ties.
- **SugarCrepe**: an image is right when its caption scores strictly higher than the negative
  caption; Replace, Swap and Add are the means of their subsets. A subset none of whose items can
  be embedded is unscored (``null``, reported) and left out of its group's mean.

Per dataset, ``out/<name>_score.json`` holds fractions (``t2i_r1``, ``t2i_r5``, ``t2i_r10``,
``i2t_r1``, ... or SugarCrepe's subsets and groups) and the counts evaluated; the table of all of them,
in percent, is ``out/retrieval_summary.{json,md}``. An image that cannot be read is left out with its
captions, and counted.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from unime_jax.data.errors import DataError
from unime_jax.embedder import UniME
from unime_jax.eval import paper, retrieval
from unime_jax.eval.encoding import Entry
from unime_jax.eval.retrieval_data import SUGARCREPE_GROUPS, SUGARCREPE_SUBSETS, Pairs, SugarCrepeSubset
from unime_jax.eval.runs import SCORE_SUFFIX, EvalRun
from unime_jax.eval.store import atomic_write_text

__all__ = [
    "KS",
    "pair_metrics",
    "read_retrieval_scores",
    "run_retrieval",
    "sugarcrepe_accuracy",
    "write_retrieval_summary",
]

KS = (1, 5, 10)
SUGARCREPE = "sugarcrepe"


def pair_metrics(
    image_emb: np.ndarray, caption_emb: np.ndarray, caption_image: Sequence[int]
) -> dict[str, float]:
    """``t2i_r{k}`` and ``i2t_r{k}`` for k in 1, 5, 10 (fractions)."""
    caption_image = np.asarray(caption_image)
    sim = np.asarray(caption_emb, np.float64) @ np.asarray(image_emb, np.float64).T
    by_image = [np.flatnonzero(caption_image == i) for i in range(len(image_emb))]
    out = {f"t2i_r{k}": retrieval.recall_at_k(sim, caption_image, k) for k in KS}
    out |= {f"i2t_r{k}": retrieval.recall_at_k(sim.T, by_image, k) for k in KS}
    return out


def sugarcrepe_accuracy(image_emb: np.ndarray, positive_emb: np.ndarray, negative_emb: np.ndarray) -> float:
    """Fraction of images whose caption beats the negative caption, strictly (a tie is wrong)."""
    return float(retrieval.compositional_scores(image_emb, positive_emb, negative_emb).mean())


def _embed(
    run: EvalRun, model: UniME, name: str, entries: list[Entry], keys: list[str]
) -> tuple[np.ndarray, list[str]]:
    identity = {"items_sha256": hashlib.sha256(json.dumps(keys).encode()).hexdigest()}
    return run.embed(model, name, entries, identity, raw=False)


def _unique_texts(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """Distinct texts (embedded once) and each text's position among them."""
    order: dict[str, int] = {}
    positions = [order.setdefault(t, len(order)) for t in texts]
    return list(order), positions


def _report(name: str, problems: list[str]) -> None:
    if problems:
        print(f"{name}: {len(problems)} item(s) left out; first: {problems[0]}", file=sys.stderr)


def evaluate_pairs(model: UniME, run: EvalRun, pairs: Pairs) -> dict[str, Any] | None:
    texts, positions = _unique_texts(pairs.captions)
    entries = [Entry(None, image) for image in pairs.images] + [Entry(t, None) for t in texts]
    # What each item is: the file for an image on disk, else where it was read from.
    images = [
        str(i) if isinstance(i, Path) else n for i, n in zip(pairs.images, pairs.image_names, strict=True)
    ]
    keys = [f"image:{i}" for i in images] + [f"text:{t}" for t in texts]
    embeddings, errors = _embed(run, model, pairs.name, entries, keys)
    if jax.process_index() != 0:
        return None
    n = len(pairs.images)
    problems = list(pairs.bad) + [f"image {pairs.image_names[i]}: {errors[i]}" for i in range(n) if errors[i]]
    captions = [
        j for j, p in enumerate(positions) if not errors[n + p] and not errors[pairs.caption_image[j]]
    ]
    problems += [f"caption {j}: {errors[n + p]}" for j, p in enumerate(positions) if errors[n + p]]
    images = sorted({pairs.caption_image[j] for j in captions})
    if not images:
        raise DataError(f"{pairs.name}: nothing could be embedded; first problem: {problems[0]}")
    remap = {old: new for new, old in enumerate(images)}
    score: dict[str, Any] = pair_metrics(
        embeddings[images],
        embeddings[[n + positions[j] for j in captions]],
        [remap[pairs.caption_image[j]] for j in captions],
    )
    score |= {"num_images": len(images), "num_captions": len(captions), "num_skipped": len(problems)}
    _report(pairs.name, problems)
    return score


def evaluate_sugarcrepe(
    model: UniME, run: EvalRun, subsets: Sequence[SugarCrepeSubset]
) -> dict[str, Any] | None:
    score: dict[str, Any] = {}
    problems: list[str] = []
    unscored: list[str] = []
    for subset in subsets:
        texts, positions = _unique_texts(subset.positives + subset.negatives)
        n = len(subset.images)
        entries = [Entry(None, image) for image in subset.images] + [Entry(t, None) for t in texts]
        keys = [f"image:{i}" for i in subset.images] + [f"text:{t}" for t in texts]
        embeddings, errors = _embed(run, model, f"{SUGARCREPE}_{subset.name}", entries, keys)
        if jax.process_index() != 0:
            continue
        pos, neg = positions[:n], positions[n:]
        failures = {i: errors[i] or errors[n + pos[i]] or errors[n + neg[i]] for i in range(n)}
        good = [i for i in range(n) if not failures[i]]
        problems += subset.bad + [f"{subset.name} item {i}: {e}" for i, e in failures.items() if e]
        if good:
            score[subset.name] = sugarcrepe_accuracy(
                embeddings[good],
                embeddings[[n + pos[i] for i in good]],
                embeddings[[n + neg[i] for i in good]],
            )
        else:  # an accuracy over no item is no number: the subset stays out of its group's mean
            score[subset.name] = None
            unscored.append(subset.name)
        score[f"num_{subset.name}"] = len(good)
    if jax.process_index() != 0:
        return None
    _report(SUGARCREPE, problems)
    if len(unscored) == len(subsets):
        first = problems[0] if problems else "every subset is empty"
        raise DataError(f"{SUGARCREPE}: nothing could be embedded; first problem: {first}")
    if unscored:
        print(
            f"{SUGARCREPE}: subset(s) {', '.join(unscored)} unscored (no item could be embedded), "
            "left out of the group means",
            file=sys.stderr,
        )
    for group, members in SUGARCREPE_GROUPS.items():
        scored = [score[m] for m in members if score[m] is not None]
        score[group] = float(np.mean(scored)) if scored else None
    score["num_skipped"] = len(problems)
    return score


def run_retrieval(
    model: UniME, run: EvalRun, pair_sets: Sequence[Pairs], sugarcrepe: Sequence[SugarCrepeSubset] = ()
) -> dict[str, dict[str, Any]]:
    """Evaluate each pairs set and SugarCrepe (skipping those scored earlier); scores by name, on process 0."""
    run.start()
    scores = {}
    for pairs in pair_sets:
        done, score = run.earlier_score(pairs.name)
        if not done and (score := evaluate_pairs(model, run, pairs)) is not None:
            run.finish(pairs.name, score)
        if score is not None:
            scores[pairs.name] = score
    if sugarcrepe:
        done, score = run.earlier_score(SUGARCREPE)
        if not done and (score := evaluate_sugarcrepe(model, run, sugarcrepe)) is not None:
            run.finish(SUGARCREPE, score, [f"{SUGARCREPE}_{s.name}" for s in sugarcrepe])
        if score is not None:
            scores[SUGARCREPE] = score
    return scores


def read_retrieval_scores(out: Path) -> dict[str, dict[str, Any]]:
    """The retrieval score files in ``out`` (those with ``t2i_r1``, and SugarCrepe's), by name."""
    scores = {}
    for path in sorted(Path(out).glob(f"*{SCORE_SUFFIX}")):
        name = path.name[: -len(SCORE_SUFFIX)]
        try:
            score = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read score file {path}: {e}") from e
        if isinstance(score, dict) and ("t2i_r1" in score or (name == SUGARCREPE and "replace" in score)):
            scores[name] = score
    return scores


def _percent(score: Mapping[str, Any]) -> dict[str, float | None]:
    """The metrics in percent; None (an unscored SugarCrepe subset or group) stays None."""
    metrics = {
        k: v for k, v in score.items() if not k.startswith("num_") and (v is None or isinstance(v, float))
    }
    return {k: None if v is None else 100 * v for k, v in metrics.items()}


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def retrieval_markdown(summary: Mapping[str, Mapping[str, float | None]], compare: str | None = None) -> str:
    published = paper.RETRIEVAL.get(compare or "", {})
    columns = [f"t2i_r{k}" for k in KS] + [f"i2t_r{k}" for k in KS]
    lines = ["# Zero-shot retrieval (R@k, %; text→image first)", ""]
    pair_names = [n for n in summary if n != SUGARCREPE]
    if pair_names:
        head = "| dataset | " + " | ".join(c.replace("_r", " R@") for c in columns) + " |"
        lines += [head, "|---|" + "---:|" * len(columns)]
        for name in pair_names:
            cells = [f"{summary[name][c]:.1f}" for c in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
            if published and f"{name}/t2i_r1" in published:
                lines.append(
                    f"| paper: {compare} | {published[f'{name}/t2i_r1']:.1f} | | | {published[f'{name}/i2t_r1']:.1f} | | |"
                )
    if SUGARCREPE in summary:
        groups = list(SUGARCREPE_GROUPS)
        lines += ["", "| SugarCrepe | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
        lines.append("| measured | " + " | ".join(_cell(summary[SUGARCREPE][g]) for g in groups) + " |")
        if published:
            lines.append(
                f"| paper: {compare} | "
                + " | ".join(f"{published[f'sugarcrepe/{g}']:.1f}" for g in groups)
                + " |"
            )
        sugarcrepe = summary[SUGARCREPE]
        if unscored := [m for m in SUGARCREPE_SUBSETS if m in sugarcrepe and sugarcrepe[m] is None]:
            lines += [
                "",
                f"Not scored (no item could be embedded; left out of the group means): {', '.join(unscored)}",
            ]
    return "\n".join(lines) + "\n"


def write_retrieval_summary(
    out: Path, scores: Mapping[str, Mapping[str, Any]], compare: str | None = None
) -> dict:
    """``out/retrieval_summary.json`` (percent) and ``.md``; ``compare`` adds a Table 2 row."""
    if compare is not None and compare not in paper.RETRIEVAL:
        raise ValueError(f"no published retrieval row {compare!r}; known: {', '.join(paper.RETRIEVAL)}")
    summary = {name: _percent(score) for name, score in scores.items()}
    atomic_write_text(Path(out) / "retrieval_summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(Path(out) / "retrieval_summary.md", retrieval_markdown(summary, compare))
    return summary

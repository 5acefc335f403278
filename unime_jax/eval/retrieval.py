"""Retrieval metrics in plain numpy: Recall@k, paired text↔image R@1, compositional (twin) accuracy.

Conventions:

- Embeddings are L2-normalised, so cosine similarity is a dot product (``evaluate(...,
  normalize=True)`` normalises first).
- **Ties never favour the gold.** With the default ``ties="against_gold"``, a query is a hit at k
  only if fewer than k non-gold candidates score at least as high as the best gold candidate: a
  non-gold candidate tied with the gold is ranked before it. Constant similarities therefore give
  R@1 = 0 (unless every candidate is gold). ``ties="expected"`` instead gives the expected hit
  rate of a uniformly random order among tied candidates (a deterministic fraction): constant
  similarities then give exactly the chance rate |gold| / Nc.
- **Group ids.** For paired data (pair i = text i + image i), ``image_ids[j]`` names what image j
  shows and ``text_ids[j]`` what text j says; equal ids mark interchangeable items (two images
  drawn from the same caption, two copies of one caption). Text query i then counts any image j
  with ``image_ids[j] == image_ids[i]`` as correct, and image query i any text j with
  ``text_ids[j] == text_ids[i]``. Without ids, only the diagonal is gold.
- Similarities must be finite (a NaN would compare false against everything and pass as a hit).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

__all__ = [
    "compositional_acc",
    "compositional_scores",
    "evaluate",
    "gold_mask",
    "hits_at_k",
    "i2t_r1",
    "l2_normalize",
    "recall_at_k",
    "t2i_r1",
]

Ties = Literal["against_gold", "expected"]
Gold = np.ndarray | Sequence[int] | Sequence[Iterable[int]]


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def gold_mask(gold: Gold, num_queries: int, num_candidates: int) -> np.ndarray:
    """Boolean (Nq, Nc) mask of the acceptable candidates of each query.

    ``gold`` is an int array (Nq,) of gold indices, a list of Nq iterables of indices (sets), or
    already a boolean (Nq, Nc) mask. Every query needs at least one gold candidate.
    """
    if isinstance(gold, np.ndarray) and gold.dtype == bool:
        if gold.shape != (num_queries, num_candidates):
            raise ValueError(f"gold mask shape {gold.shape} != {(num_queries, num_candidates)}")
        mask = gold.copy()
    else:
        if len(gold) != num_queries:
            raise ValueError(f"{len(gold)} gold entries for {num_queries} queries")
        mask = np.zeros((num_queries, num_candidates), dtype=bool)
        for q, g in enumerate(gold):
            indices = [int(i) for i in g] if isinstance(g, Iterable) else [int(g)]
            for i in indices:
                if not 0 <= i < num_candidates:
                    raise ValueError(f"gold index {i} of query {q} is outside [0, {num_candidates})")
            mask[q, indices] = True
    if not mask.any(axis=1).all():
        raise ValueError(f"queries {np.flatnonzero(~mask.any(axis=1)).tolist()} have no gold candidate")
    return mask


def hits_at_k(sim: np.ndarray, gold: Gold, k: int = 1, ties: Ties = "against_gold") -> np.ndarray:
    """Per-query hit (float64 (Nq,), in [0, 1]) at k; see the module docstring for the tie rule."""
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"sim must be (Nq, Nc), got shape {sim.shape}")
    if not np.isfinite(sim).all():
        raise ValueError("similarities must be finite")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if ties not in ("against_gold", "expected"):
        raise ValueError(f"ties must be 'against_gold' or 'expected', got {ties!r}")
    mask = gold_mask(gold, *sim.shape)
    best_gold = np.where(mask, sim, -np.inf).max(axis=1, keepdims=True)
    above = (~mask & (sim > best_gold)).sum(axis=1)  # non-gold strictly better than every gold
    tied_other = (~mask & (sim == best_gold)).sum(axis=1)
    if ties == "against_gold":
        return (above + tied_other < k).astype(np.float64)
    tied_gold = (mask & (sim == best_gold)).sum(axis=1)
    out = np.empty(sim.shape[0], dtype=np.float64)
    for q, (a, t_other, t_gold) in enumerate(zip(above, tied_other, tied_gold, strict=True)):
        slots = k - int(a)  # positions left in the top k for the tied block
        if slots <= 0:
            out[q] = 0.0
        elif slots > t_other:
            out[q] = 1.0
        else:  # P(at least one gold among the first `slots` of a random order of the tied block)
            out[q] = 1.0 - math.comb(int(t_other), slots) / math.comb(int(t_other + t_gold), slots)
    return out


def recall_at_k(sim: np.ndarray, gold: Gold, k: int = 1, ties: Ties = "against_gold") -> float:
    """Recall@k of ``sim`` (Nq, Nc) (higher = more similar) against ``gold``.

    ``gold``: int (Nq,) gold candidate per query, or a list of Nq sets of acceptable candidates, or
    a boolean (Nq, Nc) mask. A query is a hit when a gold candidate ranks in the top k, ties
    resolved against the gold (module docstring).
    """
    return float(hits_at_k(sim, gold, k, ties).mean())


def _paired_gold(n: int, ids: np.ndarray | Sequence[int] | None) -> np.ndarray:
    if ids is None:
        return np.eye(n, dtype=bool)
    ids = np.asarray(ids)
    if ids.shape != (n,):
        raise ValueError(f"ids shape {ids.shape} != ({n},)")
    return ids[:, None] == ids[None, :]


def _check_pair(a: np.ndarray, b: np.ndarray, names: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{names}: need two (N, D) arrays of equal shape, got {a.shape} and {b.shape}")
    return a, b


def _paired_r1(
    queries: np.ndarray,
    candidates: np.ndarray,
    candidate_ids: np.ndarray | Sequence[int] | None,
    ties: Ties,
    name: str,
) -> float:
    """R@1 of query i against candidates, whose gold is candidate i or any candidate with its id."""
    queries, candidates = _check_pair(queries, candidates, name)
    return recall_at_k(queries @ candidates.T, _paired_gold(len(queries), candidate_ids), 1, ties)


def t2i_r1(
    text_emb: np.ndarray,
    image_emb: np.ndarray,
    image_ids: np.ndarray | Sequence[int] | None = None,
    ties: Ties = "against_gold",
) -> float:
    """Text→image R@1 for paired (N, D) embeddings: text i's gold is image i, or any image with the
    same ``image_ids`` entry as image i."""
    return _paired_r1(text_emb, image_emb, image_ids, ties, "t2i_r1")


def i2t_r1(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_ids: np.ndarray | Sequence[int] | None = None,
    ties: Ties = "against_gold",
) -> float:
    """Image→text R@1 for paired (N, D) embeddings: image i's gold is text i, or any text with the
    same ``text_ids`` entry as text i."""
    return _paired_r1(image_emb, text_emb, text_ids, ties, "i2t_r1")


def compositional_scores(
    image_emb: np.ndarray, true_text_emb: np.ndarray, twin_text_emb: np.ndarray
) -> np.ndarray:
    """Per-image bool: the true caption scores strictly higher than its one-change twin."""
    image_emb, true_text_emb = _check_pair(image_emb, true_text_emb, "compositional_acc")
    _, twin_text_emb = _check_pair(image_emb, twin_text_emb, "compositional_acc")
    s_true = np.einsum("nd,nd->n", image_emb, true_text_emb)
    s_twin = np.einsum("nd,nd->n", image_emb, twin_text_emb)
    if not (np.isfinite(s_true).all() and np.isfinite(s_twin).all()):
        raise ValueError("similarities must be finite")
    return s_true > s_twin


def compositional_acc(image_emb: np.ndarray, true_text_emb: np.ndarray, twin_text_emb: np.ndarray) -> float:
    """Fraction of images whose true caption beats its twin (strictly: a tie counts as wrong)."""
    return float(compositional_scores(image_emb, true_text_emb, twin_text_emb).mean())


def evaluate(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    twin_emb: np.ndarray,
    *,
    text_ids: np.ndarray | Sequence[int] | None = None,
    image_ids: np.ndarray | Sequence[int] | None = None,
    twin_kinds: Sequence[str] | None = None,
    normalize: bool = False,
    ties: Ties = "against_gold",
) -> dict[str, float]:
    """Paired retrieval and compositional metrics for N images, their N captions and N twins.

    Keys: ``t2i_r1``, ``i2t_r1``, ``compositional_acc``, ``chance_r1`` (1 / number of distinct
    captions: the R@1 of a uniform guess over distinct contents; ``text_ids`` decide "distinct",
    else ``image_ids``, else all N are distinct), and with ``twin_kinds`` (N,)
    ``compositional_acc/<kind>`` per twin kind. If only one of ``text_ids``/``image_ids`` is
    given it serves for both sides (captioned pairs: both are the caption's id).
    """
    if normalize:
        image_emb, text_emb, twin_emb = (l2_normalize(x) for x in (image_emb, text_emb, twin_emb))
    if text_ids is None:
        text_ids = image_ids
    if image_ids is None:
        image_ids = text_ids
    n = len(image_emb)
    distinct = n if text_ids is None else len(np.unique(np.asarray(text_ids)))
    out = {
        "t2i_r1": t2i_r1(text_emb, image_emb, image_ids, ties),
        "i2t_r1": i2t_r1(image_emb, text_emb, text_ids, ties),
        "compositional_acc": compositional_acc(image_emb, text_emb, twin_emb),
        "chance_r1": 1.0 / distinct,
    }
    if twin_kinds is not None:
        if len(twin_kinds) != n:
            raise ValueError(f"{len(twin_kinds)} twin kinds for {n} images")
        wins = compositional_scores(image_emb, text_emb, twin_emb)
        kinds = np.asarray(twin_kinds)
        for kind in sorted(set(twin_kinds)):
            out[f"compositional_acc/{kind}"] = float(wins[kinds == kind].mean())
    return out

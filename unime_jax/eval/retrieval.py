"""Retrieval metrics in plain numpy: Recall@k and pairwise (caption vs negative) wins.

Conventions:

- Embeddings are L2-normalised, so cosine similarity is a dot product.
- **Ties never favour the gold.** A query is a hit at k only if fewer than k non-gold candidates
  score at least as high as the best gold candidate: a non-gold candidate tied with the gold is
  ranked before it. Constant similarities therefore give R@1 = 0 (unless every candidate is gold).
- **Several gold candidates.** A query may have a set of acceptable candidates (an image and its
  five captions): it is a hit when the best of them ranks in the top k.
- Similarities must be finite (a NaN would compare false against everything and pass as a hit).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["compositional_scores", "gold_mask", "hits_at_k", "recall_at_k"]

Gold = np.ndarray | Sequence[int] | Sequence[Iterable[int]]


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


def hits_at_k(sim: np.ndarray, gold: Gold, k: int = 1) -> np.ndarray:
    """Per-query hit at k (float64 (Nq,), 0 or 1); see the module docstring for the tie rule."""
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"sim must be (Nq, Nc), got shape {sim.shape}")
    if not np.isfinite(sim).all():
        raise ValueError("similarities must be finite")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    mask = gold_mask(gold, *sim.shape)
    best_gold = np.where(mask, sim, -np.inf).max(axis=1, keepdims=True)
    above = (~mask & (sim > best_gold)).sum(axis=1)  # non-gold strictly better than every gold
    tied_other = (~mask & (sim == best_gold)).sum(axis=1)
    return (above + tied_other < k).astype(np.float64)


def recall_at_k(sim: np.ndarray, gold: Gold, k: int = 1) -> float:
    """Recall@k of ``sim`` (Nq, Nc) (higher = more similar) against ``gold``.

    ``gold``: int (Nq,) gold candidate per query, or a list of Nq sets of acceptable candidates, or
    a boolean (Nq, Nc) mask. A query is a hit when a gold candidate ranks in the top k, ties
    resolved against the gold (module docstring).
    """
    return float(hits_at_k(sim, gold, k).mean())


def _check_pair(a: np.ndarray, b: np.ndarray, names: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{names}: need two (N, D) arrays of equal shape, got {a.shape} and {b.shape}")
    return a, b


def compositional_scores(
    image_emb: np.ndarray, true_text_emb: np.ndarray, twin_text_emb: np.ndarray
) -> np.ndarray:
    """Per-image bool: the true caption scores strictly higher than its one-change twin."""
    image_emb, true_text_emb = _check_pair(image_emb, true_text_emb, "compositional_scores")
    _, twin_text_emb = _check_pair(image_emb, twin_text_emb, "compositional_scores")
    s_true = np.einsum("nd,nd->n", image_emb, true_text_emb)
    s_twin = np.einsum("nd,nd->n", image_emb, twin_text_emb)
    if not (np.isfinite(s_true).all() and np.isfinite(s_twin).all()):
        raise ValueError("similarities must be finite")
    return s_true > s_twin

"""Held-out retrieval metrics of a :class:`~unime_jax.embedder.UniME` on the demo's shapes data.

Every input is embedded exactly as stage 2 trains on it (raw MMEB strings, no chat template):

- image queries: the image with ``I2T_QUERY`` (ShapesI2T's query), scored against the raw
  captions (ShapesI2T's targets) for i2t and against caption vs twin caption for compositional
  accuracy;
- caption queries: ``t2i_query(caption)`` (ShapesT2I's query), scored against the images with
  ``IMAGE_TARGET`` (ShapesT2I's targets) for t2i.

Captions with the same meaning (content ids) are interchangeable: retrieving any of them, or any
image of them, is a hit.
"""

from __future__ import annotations

import numpy as np

from unime_jax.demo.prepare import I2T_QUERY, IMAGE_TARGET, HeldOut, t2i_query
from unime_jax.embedder import UniME
from unime_jax.eval import retrieval

__all__ = ["evaluate"]


def _embeddings(embedder: UniME, heldout: HeldOut, batch_size: int, progress: bool) -> dict[str, np.ndarray]:
    images = list(heldout.images)
    n = len(images)

    def encode(texts: list[str], with_images: bool) -> np.ndarray:
        return embedder.encode(
            texts, images if with_images else None, raw=True, batch_size=batch_size, progress=progress
        )

    return {
        "image_query": encode([I2T_QUERY] * n, with_images=True),
        "image_target": encode([IMAGE_TARGET] * n, with_images=True),
        "caption": encode(heldout.captions, with_images=False),
        "caption_query": encode([t2i_query(c) for c in heldout.captions], with_images=False),
        "twin": encode(heldout.twin_captions, with_images=False),
    }


def _chance_r1(ids: np.ndarray) -> float:
    """Expected R@1 of a random ranking: a query with g gold candidates among N hits with g / N."""
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    return float(counts[inverse].mean() / len(ids))


def evaluate(
    embedder: UniME, heldout: HeldOut, *, batch_size: int = 64, progress: bool = False
) -> dict[str, float]:
    """``t2i_r1``, ``i2t_r1``, ``compositional_acc``, ``chance_r1`` and ``compositional_acc/<twin kind>``.

    R@1 ties count against the gold (a collapsed model scores 0, not chance); ``chance_r1`` is the
    R@1 of a random ranking, the same in both directions. Compositional accuracy needs the true
    caption to score strictly above its twin (chance 0.5).
    """
    emb = _embeddings(embedder, heldout, batch_size, progress)
    ids = heldout.caption_ids
    wins = retrieval.compositional_scores(emb["image_query"], emb["caption"], emb["twin"])
    out = {
        "t2i_r1": retrieval.t2i_r1(emb["caption_query"], emb["image_target"], image_ids=ids),
        "i2t_r1": retrieval.i2t_r1(emb["image_query"], emb["caption"], text_ids=ids),
        "compositional_acc": float(wins.mean()),
        "chance_r1": _chance_r1(ids),
    }
    kinds = np.asarray(heldout.twin_kinds)
    for kind in sorted(set(heldout.twin_kinds)):
        out[f"compositional_acc/{kind}"] = float(wins[kinds == kind].mean())
    return out

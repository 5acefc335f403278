"""Random token batches in the layouts the stage tasks take (query/target, anchor/positive/negative)."""

from __future__ import annotations

import numpy as np

from helpers import hf_models

T = 12


def _texts(rng: np.random.Generator, rows: int, prefix: str) -> dict[str, np.ndarray]:
    lengths = rng.integers(3, T + 1, size=rows)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(3, hf_models.VOCAB, size=(rows, T)).astype(np.int32) * mask
    return {f"{prefix}_input_ids": ids, f"{prefix}_attention_mask": mask}


def stage2_batch(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {**_texts(rng, rows, "query"), **_texts(rng, rows, "target")}


def stage1_batch(rows: int, seed: int, teacher_dim: int = 24) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = {}
    for group in ("anchor", "positive", "negative"):
        batch.update(_texts(rng, rows, group))
        batch[f"teacher_{group}"] = rng.standard_normal((rows, teacher_dim)).astype(np.float32)
    return batch

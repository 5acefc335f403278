"""The two UniME training tasks: which embeddings a batch needs, and the loss over them.

A batch is a flat dict of arrays. Keys `<group>_<input>` (e.g. `query_input_ids`,
`query_pixel_values`) are the model inputs of one group; every group is embedded by the same
model. Other keys (teacher embeddings, target ids) feed the loss only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax

from unime_jax.config import check_range
from unime_jax.training.losses import nli_candidates, stage1_kd_loss, stage2_hardneg_loss

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# What the backbones' __call__ accepts; other `<group>_*` keys (e.g. `target_ids`) feed the loss.
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "image_grids")


def group_inputs(batch: Batch, group: str) -> dict[str, jax.Array]:
    """Model inputs of one group; a (rows, k, ...) group (mined negatives) is flattened to (rows*k, ...)."""
    inputs = {name: batch[f"{group}_{name}"] for name in MODEL_INPUTS if f"{group}_{name}" in batch}
    if "attention_mask" not in inputs:
        raise KeyError(f"batch has no '{group}_attention_mask'; keys are {sorted(batch)}")
    lead = inputs["attention_mask"].ndim - 1  # 1 for (rows, T), 2 for (rows, k, T)
    if lead == 2:
        inputs = {k: v.reshape(-1, *v.shape[2:]) for k, v in inputs.items()}
    return inputs


@dataclass(frozen=True)
class Stage1Config:
    """Textual discriminative knowledge distillation (paper §3.2; choices the paper leaves open are flags)."""

    tau: float = 0.02  # temperature of both similarity distributions
    candidates: Literal["nli", "self"] = (
        "nli"  # columns: all positives+hard negatives (E5-V reading), or the anchors
    )
    direction: Literal["teacher_student", "student_teacher"] = "teacher_student"  # KL(P_t||P_s) by default

    def __post_init__(self) -> None:
        check_range(self, "tau", above=0)


@dataclass(frozen=True)
class Stage2Config:
    """Hard-negative-enhanced instruction tuning (paper §3.3)."""

    tau: float = 0.02  # InfoNCE temperature
    beta: float = 0.1  # drop candidates with S_ij > S_ii + beta as false negatives
    k: int = 8  # hard negatives per query
    all_negatives: bool = (
        False  # denominator over all unfiltered in-batch negatives (k is ignored for it if 0)
    )
    dedupe_targets: bool = False  # mask candidates whose target equals the positive (duplicate labels)

    def __post_init__(self) -> None:
        check_range(self, "tau", above=0)
        check_range(self, "k", at_least=0)


@dataclass(frozen=True)
class Stage1Task:
    cfg: Stage1Config

    def groups(self, batch: Batch) -> dict[str, dict[str, jax.Array]]:
        names = ["anchor"] if self.cfg.candidates == "self" else ["anchor", "positive", "negative"]
        return {name: group_inputs(batch, name) for name in names}

    def loss(self, embeddings: dict[str, jax.Array], batch: Batch) -> tuple[jax.Array, Metrics]:
        if self.cfg.candidates == "self":
            student_c, teacher_c = embeddings["anchor"], batch["teacher_anchor"]
        else:
            student_c = nli_candidates(embeddings["positive"], embeddings["negative"])
            teacher_c = nli_candidates(batch["teacher_positive"], batch["teacher_negative"])
        return stage1_kd_loss(
            embeddings["anchor"],
            student_c,
            batch["teacher_anchor"],
            teacher_c,
            tau=self.cfg.tau,
            direction=self.cfg.direction,
            mask_diagonal=self.cfg.candidates == "self",
        )


@dataclass(frozen=True)
class Stage2Task:
    cfg: Stage2Config
    in_batch: bool = True  # false: mined or data negatives (the batch's `negative_*`) are the only negatives

    def groups(self, batch: Batch) -> dict[str, dict[str, jax.Array]]:
        names = ["query", "target"] + (["negative"] if "negative_attention_mask" in batch else [])
        return {name: group_inputs(batch, name) for name in names}

    def loss(self, embeddings: dict[str, jax.Array], batch: Batch) -> tuple[jax.Array, Metrics]:
        q = embeddings["query"]
        extra = None
        if "negative" in embeddings:
            extra = embeddings["negative"].reshape(q.shape[0], -1, q.shape[-1])
        return stage2_hardneg_loss(
            q,
            embeddings["target"],
            tau=self.cfg.tau,
            beta=self.cfg.beta,
            k=self.cfg.k if self.in_batch else 0,
            all_negatives=self.cfg.all_negatives and self.in_batch,
            target_ids=batch.get("target_ids") if self.cfg.dedupe_targets else None,
            extra_c=extra,
            extra_valid=batch.get("valid_negatives") if extra is not None else None,
        )


Task = Stage1Task | Stage2Task

"""optax AdamW with warmup + cosine/linear decay, global-norm clipping and gradient accumulation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import optax

from unime_jax.config import check_range


@dataclass(frozen=True)
class OptimizerConfig:
    """How trainable parameters are updated."""

    learning_rate: float = 1e-4  # peak learning rate
    warmup_steps: int = 0  # linear warmup from 0 to the peak
    schedule: Literal["cosine", "linear", "constant"] = "linear"  # decay after warmup
    end_lr_ratio: float = 0.0  # final lr as a fraction of the peak
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.999  # Adam second-moment decay
    eps: float = 1e-8  # Adam epsilon
    grad_clip: float | None = 1.0  # clip by global norm; null = no clipping
    accumulation_steps: int = 1  # optimizer update every N steps, averaging their gradients

    def __post_init__(self) -> None:
        check_range(self, "learning_rate", above=0)
        check_range(self, "warmup_steps", at_least=0)
        check_range(self, "end_lr_ratio", at_least=0, at_most=1)
        check_range(self, "weight_decay", at_least=0)
        for name in ("b1", "b2"):
            check_range(self, name, at_least=0, below=1)
        check_range(self, "eps", above=0)
        check_range(self, "grad_clip", above=0)
        check_range(self, "accumulation_steps", at_least=1)


def make_schedule(cfg: OptimizerConfig, total_updates: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer update count."""
    warmup = min(cfg.warmup_steps, total_updates)
    decay = max(total_updates - warmup, 1)
    end = cfg.learning_rate * cfg.end_lr_ratio
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.learning_rate, decay, alpha=cfg.end_lr_ratio)
    else:
        after = optax.linear_schedule(cfg.learning_rate, end, decay)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), after], [warmup])


def make_optimizer(
    cfg: OptimizerConfig, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its schedule (indexed by optimizer updates, i.e. steps / accumulation)."""
    if cfg.accumulation_steps < 1:
        raise ValueError(f"optimizer.accumulation_steps must be >= 1, got {cfg.accumulation_steps}")
    schedule = make_schedule(cfg, max(total_steps // cfg.accumulation_steps, 1))
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    tx = optax.chain(*parts)
    if cfg.accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulation_steps)
    return tx, schedule

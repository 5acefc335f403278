"""The training loop: global batches in, steps, metrics with a progress bar, checkpoints out."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from unime_jax.sharding import global_batch
from unime_jax.training.checkpoints import Checkpoints
from unime_jax.training.metrics import MetricsWriter
from unime_jax.training.trainer import Trainer, TrainState


class TrainingDivergedError(RuntimeError):
    """Too many consecutive NaN/inf steps; the last good checkpoint was left untouched."""


@dataclass
class LoopConfig:
    total_steps: int
    save_every: int = 100  # checkpoint interval in steps (the final step is always saved)
    log_every: int = 1  # metrics interval in steps
    desc: str = "train"  # progress-bar label and metrics split name


def _tokens(local: dict[str, np.ndarray]) -> int:
    return int(sum(v.sum() for k, v in local.items() if k.endswith("attention_mask"))) * jax.process_count()


def _rows(local: dict[str, np.ndarray]) -> int:
    masks = [v for k, v in local.items() if k.endswith("attention_mask")]
    return masks[0].shape[0] * jax.process_count() if masks else 0


def run(
    trainer: Trainer,
    state: TrainState,
    batches: Iterator[dict[str, np.ndarray]],
    loop: LoopConfig,
    mesh: Mesh,
    writer: MetricsWriter,
    *,
    checkpoints: Checkpoints | None = None,
    identity: dict | None = None,
    config: dict | None = None,
    data_iterator: Any | None = None,
    flops_per_token: float | None = None,
    peak: float | None = None,
    data_stats: Callable[[], dict[str, float]] | None = None,
) -> tuple[TrainState, list[dict[str, float]]]:
    """Train from state.step to loop.total_steps; returns the final state and per-step metrics."""
    history: list[dict[str, float]] = []
    start = int(state.step)
    bar = tqdm(
        total=loop.total_steps, initial=start, desc=loop.desc, unit="step", disable=jax.process_index() != 0
    )
    for step in range(start, loop.total_steps):
        local = next(batches)
        tic = time.perf_counter()
        state, metrics = trainer.step(state, global_batch(local, mesh))
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - tic
        if int(state.nonfinite_run) >= trainer.cfg.max_nonfinite:
            raise TrainingDivergedError(
                f"{trainer.cfg.max_nonfinite} consecutive steps had NaN/inf loss or gradients (at step {step + 1}); "
                "stopped without saving. Lower the learning rate or check the data; the last good checkpoint is kept."
            )
        values.update(
            step_time_s=elapsed, items_per_s=_rows(local) / elapsed, tokens_per_s=_tokens(local) / elapsed
        )
        if flops_per_token and peak:
            values["mfu"] = flops_per_token * values["tokens_per_s"] / (peak * jax.device_count())
        history.append(values)
        if (step + 1) % loop.log_every == 0:
            # Skipped/truncated sample counts ride along, so nothing is dropped silently.
            writer.write(step + 1, {**values, **(data_stats() if data_stats else {})}, loop.desc)
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
        bar.update(1)
        done = step + 1 == loop.total_steps
        if checkpoints is not None and ((step + 1) % loop.save_every == 0 or done):
            checkpoints.save(step + 1, state, identity or {}, config or {}, data_iterator)
    bar.close()
    if checkpoints is not None:
        checkpoints.wait()
    return state, history

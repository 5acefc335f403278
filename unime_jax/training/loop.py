"""The training loop: global batches in, steps, metrics with a progress bar, checkpoints out."""

from __future__ import annotations

import time
from collections.abc import Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from unime_jax.data.packing import PACKED_PREFIX
from unime_jax.sharding import global_batch
from unime_jax.training.checkpoints import Checkpoints
from unime_jax.training.metrics import MetricsWriter
from unime_jax.training.trainer import Trainer, TrainState

PACKED_ROW_LEN, PACKED_ROLE = PACKED_PREFIX + "row_len", PACKED_PREFIX + "role_"


class TrainingDivergedError(RuntimeError):
    """Too many consecutive NaN/inf steps; the last good checkpoint was left untouched."""


def _tokens(local: dict[str, np.ndarray]) -> int:
    if PACKED_ROW_LEN in local:  # the packed layout keeps real tokens only
        return int(local[PACKED_ROW_LEN].sum()) * jax.process_count()
    return int(sum(v.sum() for k, v in local.items() if k.endswith("attention_mask"))) * jax.process_count()


def _rows(local: dict[str, np.ndarray]) -> int:
    """Examples (queries, anchors) in the global batch."""
    roles = [v for k, v in local.items() if k.startswith(PACKED_ROLE)]
    if roles:  # (shards, rows / shards, 2) per role; mined negatives have k times the rows
        return min(v.shape[0] * v.shape[1] for v in roles) * jax.process_count()
    masks = [v for k, v in local.items() if k.endswith("attention_mask")]
    return masks[0].shape[0] * jax.process_count() if masks else 0


def run(
    trainer: Trainer,
    state: TrainState,
    batches: Iterator[dict[str, np.ndarray]],
    writer: MetricsWriter,
    *,
    checkpoints: Checkpoints | None = None,
    label: str = "train",
    stop_at: int | None = None,
) -> tuple[TrainState, list[dict[str, float]]]:
    """Train from state.step to the trainer's total steps (or ``stop_at``, saving there, for a later
    run to resume); returns the final state and per-step metrics.

    ``batches`` yields this process's rows of each global batch; with ``checkpoints`` it is saved
    with every checkpoint (a grain iterator), and an iterator with ``total_counts()`` (the
    pipeline's ``DataIterator``) has its skipped/truncated sample counts logged with the metrics,
    so nothing is dropped silently. ``label`` names the progress bar and the metrics split.
    """
    stage, total = trainer.stage, trainer.total_steps
    end = total if stop_at is None else min(stop_at, total)
    counts = getattr(batches, "total_counts", None)
    history: list[dict[str, float]] = []
    start = int(state.step)
    bar = tqdm(total=total, initial=start, desc=label, unit="step", disable=jax.process_index() != 0)
    for step in range(start, end):
        local = next(batches)
        tic = time.perf_counter()
        state, metrics = trainer.step(state, global_batch(local, trainer.mesh))
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - tic
        if int(state.nonfinite_run) >= stage.max_nonfinite:
            raise TrainingDivergedError(
                f"{stage.max_nonfinite} consecutive steps had NaN/inf loss or gradients (at step {step + 1}); "
                "stopped without saving. Lower the learning rate or check the data; the last good checkpoint is kept."
            )
        values.update(
            step_time_s=elapsed, items_per_s=_rows(local) / elapsed, tokens_per_s=_tokens(local) / elapsed
        )
        if trainer.peak_flops:
            values["mfu"] = (
                trainer.flops_per_token * values["tokens_per_s"] / (trainer.peak_flops * jax.device_count())
            )
        history.append(values)
        if (step + 1) % stage.log_every == 0:
            writer.write(step + 1, {**values, **(counts().metrics() if counts else {})}, label)
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
        bar.update(1)
        if checkpoints is not None and ((step + 1) % stage.save_every == 0 or step + 1 == end):
            checkpoints.save(step + 1, state, batches)
    bar.close()
    if checkpoints is not None:
        checkpoints.wait()
    return state, history

"""The training loop: global batches in, steps, metrics with a progress bar, checkpoints out."""

from __future__ import annotations

import time
from collections.abc import Iterator

import jax
import numpy as np

from unime_jax.data.errors import DataError
from unime_jax.data.packing import PACKED_PREFIX
from unime_jax.progress import progress_bar
from unime_jax.sharding import global_batch
from unime_jax.training.checkpoints import Checkpoints
from unime_jax.training.distributed import checked_on_every_process
from unime_jax.training.metrics import MetricsWriter
from unime_jax.training.profiling import StepTrace
from unime_jax.training.trainer import Trainer, TrainState

PACKED_ROW_LEN, PACKED_ROLE = PACKED_PREFIX + "row_len", PACKED_PREFIX + "role_"


class TrainingDivergedError(RuntimeError):
    """Too many consecutive NaN/inf steps; the last good checkpoint was left untouched."""

    exit_code = 1  # a failure while running, for the command lines (unime_jax.cli_errors)


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


def _throughput(trainer: Trainer, local: dict[str, np.ndarray], elapsed: float) -> dict[str, float]:
    """Step time, rows/s, tokens/s and (with a known peak) MFU of one step on this batch."""
    tokens_per_s = _tokens(local) / elapsed
    rates = {"step_time_s": elapsed, "items_per_s": _rows(local) / elapsed, "tokens_per_s": tokens_per_s}
    if trainer.peak_flops:
        rates["mfu"] = trainer.flops_per_token * tokens_per_s / (trainer.peak_flops * jax.device_count())
    return rates


def _last_good(checkpoints: Checkpoints | None) -> str:
    last = None if checkpoints is None else checkpoints.latest_step()
    if last is None:
        return "no checkpoint was written"
    return f"the last good checkpoint, step {last} in {checkpoints.directory}, is kept"


Fetched = tuple[dict[str, np.ndarray], dict[str, jax.Array]]


def _agreed(fetched: Fetched | DataError) -> Fetched:
    """A fetched batch, once every process has read its rows. A process whose data failed its
    bad-sample limit stops the run on every process (a collective): one that stopped alone would
    leave the others waiting in the next step forever."""

    def read() -> Fetched:
        if isinstance(fetched, DataError):
            raise fetched
        return fetched

    return checked_on_every_process(read, DataError)


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
    bar = progress_bar(total=total, initial=start, desc=label, unit="step", disable=jax.process_index() != 0)
    trace = StepTrace(stage.profile, writer.tensorboard_dir)  # the stage's `profile` window, if any

    def fetch() -> Fetched | DataError:
        """This process's rows of the next batch, sent on; its data verdict is agreed on later,
        once the step running meanwhile has ended (:func:`_agreed`)."""
        try:
            local = next(batches)
        except DataError as e:
            return e
        return local, global_batch(local, trainer.mesh)  # the transfer runs asynchronously

    try:
        pending = fetch() if start < end else None
        postponed = False  # a save that fell inside a NaN/inf streak: taken at the first clean step
        for step in range(start, end):
            local, batch = _agreed(pending)
            trace.before(step + 1)
            tic = time.perf_counter()
            state, metrics = trainer.step(state, batch)
            seen = counts().metrics() if counts else {}  # the samples up to this step's batch
            save = checkpoints is not None and (postponed or (step + 1) % stage.save_every == 0 or step + 1 == end)
            # Batch k+1 is read and sent while step k runs, before its metrics block the host. A
            # checkpoint must hold the iterator positioned at batch k+1, so at a save it is read after.
            pending = fetch() if step + 1 < end and not save else None
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - tic
            trace.after(step + 1)
            if int(state.nonfinite_run) >= stage.max_nonfinite:
                raise TrainingDivergedError(
                    f"{stage.max_nonfinite} consecutive steps had NaN/inf loss or gradients (at step {step + 1}); "
                    f"stopped without saving. Lower the learning rate or check the data; {_last_good(checkpoints)}"
                )
            values.update(_throughput(trainer, local, elapsed))
            history.append(values)
            if (step + 1) % stage.log_every == 0:
                writer.write(step + 1, {**values, **seen}, label)
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", refresh=False)
            bar.update(1)
            if save:
                postponed = int(state.nonfinite_run) > 0  # no checkpoint while the streak counter is above 0
                if not postponed:
                    checkpoints.save(step + 1, state, batches)
                pending = fetch() if step + 1 < end else None
    finally:  # also on a stop (divergence, bad data, Ctrl-C): the profiler must not keep running
        bar.close()
        trace.close()
    if checkpoints is not None:
        checkpoints.wait()
    return state, history

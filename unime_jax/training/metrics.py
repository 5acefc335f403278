"""Training metrics: JSON lines in <workdir>/metrics.jsonl, TensorBoard event files, optionally
Weights & Biases (``training.tracking``), model FLOPs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax

from unime_jax.atomic import write_text
from unime_jax.training.tracking import WandbRun, WandbSection

# Measured dense bf16 matmul rates (FLOP/s): an 8192³ bf16 matmul on the card (BENCHMARKS.md), the
# MFU denominator.
MEASURED_PEAK_FLOPS = {"NVIDIA H200": 760e12}


def peak_flops(override_tflops: float | None = None) -> float | None:
    """Per-device peak for MFU: the configured value, else the measured rate of a known card."""
    if override_tflops:
        return override_tflops * 1e12
    return MEASURED_PEAK_FLOPS.get(jax.devices()[0].device_kind)


def lm_flops_per_token(frozen_params: int, trainable_params: int, gradcache: bool) -> float:
    """Model FLOPs per token, LoRA-aware: frozen weights 4N (forward + activation grads),
    trained weights 6N, GradCache one extra forward (2N on every weight). Attention is left out,
    which under-counts for long sequences: MFU is a lower bound."""
    flops = 4 * frozen_params + 6 * trainable_params
    if gradcache:
        flops += 2 * (frozen_params + trainable_params)
    return float(flops)


def _keep_until(path: Path, step: int) -> None:
    """Drop the rows of ``path`` after ``step`` (atomically): a resumed run writes them again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if _step(line) <= step]
    write_text(path, "".join(kept))


def _step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut short by a kill: dropped with the rows after the checkpoint


class MetricsWriter:
    """Writes on process 0 only; other processes get a no-op writer.

    Args:
      start_step: the step training starts (or resumes) from: rows already in metrics.jsonl after
        it (written before a kill, after the checkpoint resumed from) are dropped, so every step
        appears once. None appends to the file as it is.
      wandb: also log every row to a W&B run (``metrics.wandb``), named for ``label`` and given
        ``run_config`` (the resolved config) as its config.
    """

    def __init__(
        self,
        workdir: Path,
        enabled: bool | None = None,
        start_step: int | None = None,
        *,
        wandb: WandbSection | None = None,
        label: str = "train",
        run_config: dict[str, Any] | None = None,
    ):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.tensorboard_dir = Path(workdir) / "tensorboard"
        self._jsonl = None
        self._tb = None
        self.wandb: WandbRun | None = None
        if self.enabled:
            workdir = Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            # W&B first: the step that most often fails (network, login) leaves no file open.
            if wandb is not None:
                self.wandb = WandbRun(wandb, workdir, label, run_config or {})
            try:
                self._open_files(workdir, start_step)
            except BaseException:
                if self.wandb is not None:
                    self.wandb.finish(exit_code=1)
                raise

    def _open_files(self, workdir: Path, start_step: int | None) -> None:
        if start_step is not None:
            _keep_until(workdir / "metrics.jsonl", start_step)
        self._jsonl = (workdir / "metrics.jsonl").open("a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(self.tensorboard_dir))

    def write(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None}
        self._jsonl.write(json.dumps({"step": step, "split": prefix, **clean}) + "\n")
        self._jsonl.flush()
        for key, value in clean.items():
            if math.isfinite(value):
                self._tb.add_scalar(f"{prefix}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(step, {f"{prefix}/{key}": value for key, value in clean.items()})

    def close(self, failed: bool = False) -> None:
        """Close the files and the W&B run; ``failed``: the training it logged raised (W&B marks
        the run failed)."""
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)

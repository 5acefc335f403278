"""Training metrics: JSON lines in <workdir>/metrics.jsonl, TensorBoard event files, model FLOPs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax

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


class MetricsWriter:
    """Writes on process 0 only; other processes get a no-op writer."""

    def __init__(self, workdir: Path, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if self.enabled:
            workdir = Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = (workdir / "metrics.jsonl").open("a")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None}
        self._jsonl.write(json.dumps({"step": step, "split": prefix, **clean}) + "\n")
        self._jsonl.flush()
        for key, value in clean.items():
            if math.isfinite(value):
                self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()

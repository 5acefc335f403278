"""Run-config sections for the training stages (`stage1:` / `stage2:` in a YAML config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from unime_jax.training.optimizer import OptimizerConfig
from unime_jax.training.tasks import Stage1Config, Stage2Config


@dataclass
class LoraSection:
    enabled: bool = True  # false = full fine-tuning of every parameter
    rank: int | None = None  # LoRA r (needed when enabled; the paper's: 32 in stage 1, 16 in stage 2)
    alpha: float | None = None  # the update is scaled by alpha/r (needed when enabled)
    dropout: float | None = None  # adapter input dropout (needed when enabled)
    targets: str | None = None  # regex over module paths; null = the backbone's LM attention+MLP projections
    vision: bool = False  # also adapt the vision tower's attention (stage 2 option)


@dataclass
class LayoutSection:
    mode: Literal["padded", "packed"] = (
        "padded"  # padded: every row at the worst-case shape; packed: rows regrouped by modality and length class, real tiles only
    )
    chunk_tokens: int = 8192  # packed: most tokens per batch shard (device) in one chunk
    max_chunk_rows: int = 16  # packed: most rows per batch shard in one chunk (short rows get small chunks)
    tile_chunk: int = 8  # packed: vision-tower tiles per batch shard per chunk

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "max_chunk_rows", "tile_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"layout.{name} must be positive, got {getattr(self, name)}")


@dataclass
class StageSection:
    steps: int | None = None  # train steps; null = epochs x batches per epoch
    epochs: float = 1.0  # passes over the data when steps is null
    batch_size: int = 32  # global batch (rows); split evenly over processes
    grad_chunks: int = 1  # GradCache chunks; >1 lets a large batch fit (rows must divide evenly); packed layout: >1 = GradCache over its chunks
    max_nonfinite: int = 5  # stop after this many consecutive NaN/inf steps
    save_every: int = 100  # checkpoint interval in steps
    keep_checkpoints: int = 3  # checkpoints kept per stage (orbax deletes older ones)
    log_every: int = 1  # metrics interval in steps
    peak_tflops: float | None = None  # per-device peak for MFU; null = measured rate of known cards
    lora: LoraSection = field(default_factory=LoraSection)  # adapters (or full fine-tuning)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # AdamW + schedule
    layout: LayoutSection = field(
        default_factory=LayoutSection
    )  # how a batch's rows are shaped for the device


@dataclass
class Stage1Section(StageSection):
    loss: Stage1Config = field(default_factory=Stage1Config)  # KD loss choices


@dataclass
class NegativesSection:
    mode: Literal["in_batch", "mined", "both"] = "in_batch"  # batch top-k (paper), table only, or both
    dir: str | None = None  # mined table (python -m unime_jax.mine --out DIR); needed by mined/both
    k: int = 1  # mined negatives per example (≤ the table's K); each is one more embedding per row

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if (self.mode == "in_batch") != (self.dir is None):
            raise ValueError(
                f"mode {self.mode!r} with dir {self.dir!r}: modes mined and both need dir (a table written "
                "by python -m unime_jax.mine), in_batch takes none"
            )


@dataclass
class Stage2Section(StageSection):
    loss: Stage2Config = field(default_factory=Stage2Config)  # hard-negative InfoNCE choices
    negatives: NegativesSection = field(default_factory=NegativesSection)  # in-batch and/or mined negatives

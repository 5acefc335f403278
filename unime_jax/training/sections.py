"""Run-config sections for the training stages (`stage1:` / `stage2:` in a YAML config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from unime_jax.config import FieldError, check_range
from unime_jax.training.optimizer import OptimizerConfig
from unime_jax.training.tasks import Stage1Config, Stage2Config


@dataclass
class LoraSection:
    enabled: bool = True  # false = full fine-tuning of every parameter
    rank: int | None = None  # LoRA r (needed when enabled; the paper's: 32 in stage 1, 16 in stage 2)
    alpha: float | None = None  # the update is scaled by alpha/r (needed when enabled)
    dropout: float | None = None  # adapter input dropout (needed when enabled)
    targets: str | None = None  # regex over module paths; null = the preset's modules
    preset: Literal["unime", "vlm2vec"] = "unime"  # backbone's projections / VLM2Vec's list (+ CLIP attn)
    vision: bool = False  # unime preset: also adapt the vision tower's attention (stage 2 option)
    variant: Literal["lora", "dora"] = "lora"  # dora: PEFT's use_dora (a trained magnitude per output column)
    init: Literal["default", "gaussian"] = "default"  # lora_A init: PEFT's kaiming-uniform, or N(0, 1/r)
    quantize_base: Literal["none", "nf4"] = "none"  # nf4: QLoRA, adapted kernels frozen as NF4

    def __post_init__(self) -> None:
        check_range(self, "rank", at_least=1)
        check_range(self, "alpha", above=0)
        check_range(self, "dropout", at_least=0, below=1)


@dataclass
class LayoutSection:
    mode: Literal["padded", "packed"] = (
        "padded"  # padded: every row at the worst-case shape; packed: rows regrouped by modality and length class, real tiles only
    )
    chunk_tokens: int = 8192  # packed: most tokens per batch shard (device) in one chunk
    max_chunk_rows: int = 16  # packed: most rows per batch shard in one chunk (short rows get small chunks)
    tile_chunk: int = 8  # packed: vision-tower tiles per batch shard per chunk
    length_step: int = 8  # packed: class lengths step by this up to 8 steps, then by doubled steps (to 256)

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "max_chunk_rows", "tile_chunk", "length_step"):
            check_range(self, name, at_least=1)


@dataclass
class ProfileSection:
    start_step: int = 1  # first step traced, counted from 1 as in metrics.jsonl
    num_steps: int = 3  # steps traced; the trace goes to <stage>/tensorboard/plugins/profile/

    def __post_init__(self) -> None:
        check_range(self, "start_step", at_least=1)
        check_range(self, "num_steps", at_least=1)


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
    profile: ProfileSection | None = None  # jax.profiler trace of these steps into tensorboard/; null = none

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_chunks", "max_nonfinite", "save_every", "keep_checkpoints", "log_every"):
            check_range(self, name, at_least=1)
        check_range(self, "epochs", above=0)
        check_range(self, "peak_tflops", above=0)
        if self.layout.mode == "padded" and self.batch_size % self.grad_chunks:
            raise FieldError(
                "grad_chunks",
                f"({self.grad_chunks}) must divide batch_size ({self.batch_size}): each GradCache chunk "
                "embeds batch_size / grad_chunks rows",
            )


@dataclass
class Stage1Section(StageSection):
    loss: Stage1Config = field(default_factory=Stage1Config)  # KD loss choices


@dataclass
class NegativesSection:
    mode: Literal["in_batch", "mined", "both", "data", "in_batch_data"] = "in_batch"  # batch top-k (paper), mined table, both, the data's neg_text/neg_image_path, or in_batch_data (batch + data)
    dir: str | None = None  # mined table (python -m unime_jax.mine --out DIR); needed by mined/both
    k: int = 1  # mined or data negatives per example (≤ the table's K); each is one more embedding per row

    def __post_init__(self) -> None:
        check_range(self, "k", at_least=1)
        if (self.mode in ("mined", "both")) != (self.dir is not None):
            raise ValueError(
                f"mode {self.mode!r} with dir {self.dir!r}: modes mined and both need dir (a table written "
                "by python -m unime_jax.mine); in_batch takes none, and neither do data and in_batch_data "
                "(their negatives are the data's own columns)"
            )

    @property
    def in_batch(self) -> bool:
        """Whether the batch's top-k hard negatives are used."""
        return self.mode in ("in_batch", "both", "in_batch_data")

    @property
    def source(self) -> Literal["mined", "data"] | None:
        """Where the extra per-row negatives come from (None: the batch alone)."""
        return {"mined": "mined", "both": "mined", "data": "data", "in_batch_data": "data"}.get(self.mode)


@dataclass
class Stage2Section(StageSection):
    loss: Stage2Config = field(default_factory=Stage2Config)  # hard-negative InfoNCE choices
    negatives: NegativesSection = field(default_factory=NegativesSection)  # in-batch, mined and/or data negatives

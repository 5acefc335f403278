"""The run config of ``python -m unime_jax.train`` (and what ``mine`` reads): its sections.

Each section is defined with the code it configures (``data.config``, ``training.sections``,
``demo.config``); the sections that belong to no single package are here. Every field carries a
trailing comment, which :func:`unime_jax.config.describe` shows in ``--help``. Load one with
``unime_jax.config.load_config(path, overrides, Config)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from unime_jax.config import FieldError, check_range
from unime_jax.data.config import DataSection
from unime_jax.demo.config import DemoSection
from unime_jax.training.sections import Stage1Section, Stage2Section
from unime_jax.training.tracking import MetricsSection

__all__ = ["Config", "DistributedSection", "ExportSection", "MeshSection", "ModelSection"]


@dataclass
class ModelSection:
    checkpoint: str | None = None  # converted unime-jax checkpoint dir or a HuggingFace model dir
    init: dict[str, Any] | None = None  # no checkpoint: an HF config.json dict to build a random model from
    tokenizer: str | None = None  # tokenizer dir, or 'mistral-common'; null = the checkpoint dir
    dtype: Literal["float32", "bfloat16"] = "bfloat16"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of stored/trainable params
    attention: Literal["auto", "xla", "cudnn"] = "auto"  # auto = cudnn on GPU with bf16, else xla
    remat: Literal["none", "full", "dots_saveable"] = "none"  # activation rematerialisation policy


@dataclass
class MeshSection:
    data: int = -1  # data-parallel axis size; -1 fills from the device count (at most one axis may be -1)
    fsdp: int = 1  # fully-sharded data-parallel axis size (params/optimizer state sharded)
    tensor: int = 1  # tensor-parallel axis size (weights split within a layer)

    def __post_init__(self) -> None:
        for name in ("data", "fsdp", "tensor"):
            size = getattr(self, name)
            if size < 1 and size != -1:
                raise FieldError(name, f"must be at least 1, or -1 (fill from the device count), got {size}")


@dataclass
class DistributedSection:
    coordinator_address: str | None = (
        None  # host:port of process 0; null = single process or auto-detected cluster
    )
    num_processes: int | None = None  # processes in the run (with coordinator_address)
    process_id: int | None = None  # this process's index (with coordinator_address)

    def __post_init__(self) -> None:
        check_range(self, "num_processes", at_least=1)
        check_range(self, "process_id", at_least=0)


@dataclass
class ExportSection:
    hf: bool = True  # write <workdir>/export/hf: the trained model merged, as an HF directory
    peft: bool = True  # write <workdir>/export/peft: the last stage's LoRA as a PEFT adapter (+ its base)
    base_model: str | None = None  # model cards' base_model (a Hub id); null = model.checkpoint


@dataclass
class Config:
    stages: tuple[Literal["stage1", "stage2"], ...] = ("stage1", "stage2")  # stages to run, in order
    model: ModelSection = field(default_factory=ModelSection)  # backbone checkpoint and numerics
    mesh: MeshSection = field(default_factory=MeshSection)  # device mesh layout
    distributed: DistributedSection = field(default_factory=DistributedSection)  # multi-host start-up
    data: DataSection = field(default_factory=DataSection)  # training data
    stage1: Stage1Section = field(default_factory=Stage1Section)  # textual knowledge distillation
    stage2: Stage2Section = field(default_factory=Stage2Section)  # hard-negative instruction tuning
    export: ExportSection = field(default_factory=ExportSection)  # what is written at the end
    metrics: MetricsSection = field(default_factory=MetricsSection)  # where metrics go besides metrics.jsonl and TensorBoard
    demo: DemoSection | None = None  # generate the CPU demo's data and evaluate before/after each stage
    workdir: str = "runs/default"  # where checkpoints, logs and the resolved config are written
    seed: int = 0  # global RNG seed (params init, data shuffling, dropout)

    def __post_init__(self) -> None:
        check_range(self, "seed", at_least=0, below=2**31)  # grain's shuffle seeds are uint32, plus stage offsets



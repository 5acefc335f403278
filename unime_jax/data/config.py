"""Data config sections, loadable with :func:`unime_jax.config.from_dict` (``data:`` in a run config).

Every field carries a trailing comment: :func:`unime_jax.config.describe` shows it in ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from unime_jax.config import FieldError, check_range

__all__ = ["DataSection", "LoaderSection", "MmebSection", "NliSection", "TextSection"]


@dataclass
class LoaderSection:
    batch_size: int = 32  # examples per process per batch; the global batch is this × process count
    num_epochs: int | None = None  # passes over the data; None repeats forever (the engine stops by steps)
    num_workers: int = 0  # grain worker processes featurizing batches; 0 = in the training process
    worker_buffer_size: int = 2  # batches each worker prepares ahead
    read_threads: int = 1  # threads per process featurizing batches ahead (0 = synchronous)
    prefetch_batches: int = 2  # batches buffered per process by those threads
    bucket_lengths: tuple[int, ...] = ()  # cut sequences to the smallest fitting length per role; () = no cut
    max_bad_fraction: float = 0.01  # stop once more than this fraction of samples was skipped as bad ...
    min_samples_before_stop: int = 1000  # ... but only judge after this many samples (per process)
    max_replacement_draws: int = 32  # random replacements tried for a bad sample before giving up

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_epochs", "worker_buffer_size"):
            check_range(self, name, at_least=1)
        for name in ("num_workers", "read_threads", "prefetch_batches", "min_samples_before_stop", "max_replacement_draws"):
            check_range(self, name, at_least=0)
        check_range(self, "max_bad_fraction", at_least=0, at_most=1)
        buckets = list(self.bucket_lengths)
        if buckets != sorted(set(buckets)) or any(b < 1 for b in buckets):
            raise ValueError(f"bucket_lengths must be positive and increasing, got {self.bucket_lengths}")


@dataclass
class TextSection:
    # E5-V/UniME stage-1 prompts: Phi-3.5-V '<|user|>\n{text}\nSummary above sentence in one word:<|end|>\n<|assistant|>\n',
    # LLaVA-1.6 '[INST] {text}\nSummary above sentence in one word: [/INST]'.
    template: str = "{text}"  # stage-1 prompt with one {text} placeholder
    max_len: int = 64  # prompt length in tokens; longer texts are shortened (template kept) and counted

    def __post_init__(self) -> None:
        check_range(self, "max_len", at_least=1)
        if self.template.count("{text}") != 1:
            raise FieldError("template", f"must hold exactly one {{text}} placeholder, got {self.template!r}")


@dataclass
class NliSection:
    csv: str  # SimCSE nli_for_simcse.csv (columns sent0,sent1,hard_neg)
    teacher_dir: str  # store written by python -m unime_jax.teacher for exactly this csv
    teacher: str | None = None  # require this teacher name in the store manifest (None: any)
    teacher_dim: int | None = None  # require this embedding dimension (None: any)
    instruction: str | None = None  # require this teacher instruction (None: any)

    def __post_init__(self) -> None:
        check_range(self, "teacher_dim", at_least=1)


@dataclass
class MmebSection:
    root: str  # MMEB-train download: <root>/<Subset>/<split>-*.parquet
    image_root: str | None = None  # directory the parquet image paths are relative to; None = root
    split: Literal["original", "diverse_instruction"] = "original"  # instruction variant
    subsets: tuple[str, ...] = ()  # subsets to use; () = every subset found under root
    max_per_subset: int | None = 100000  # first rows kept per subset (VLM2Vec: 100000); None = all
    # Stage 2 and the miner resize each image as VLM2Vec's process_image and eval's --image-size do.
    image_size: int | None = None  # resize every image to N x N first (aspect ignored); None = native size

    def __post_init__(self) -> None:
        check_range(self, "max_per_subset", at_least=1)
        check_range(self, "image_size", at_least=1)

    @property
    def images(self) -> Path:
        """Where the parquet image paths point into: image_root, else root."""
        return Path(self.image_root or self.root)


@dataclass
class DataSection:
    loader: LoaderSection = field(default_factory=LoaderSection)  # batching, workers, bad-sample policy
    text: TextSection = field(default_factory=TextSection)  # stage-1 student prompt and length
    nli: NliSection | None = None  # stage-1 data
    mmeb: MmebSection | None = None  # stage-2 data

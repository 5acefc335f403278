"""The ``demo:`` run-config section: synthetic shapes data for the embedded CPU demo.

Loadable with :func:`unime_jax.config.from_dict`; every field carries a trailing comment, which
:func:`unime_jax.config.describe` shows in ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass

from unime_jax.training.sections import Stage2Section

__all__ = ["DemoSection"]


@dataclass
class DemoSection:
    train_scenes: int = 1536  # training scenes: rows of the NLI CSV and of each MMEB subset
    eval_scenes: int = 256  # held-out scenes the retrieval metrics are computed on
    image_size: int = 56  # rendered image side in pixels
    num_objects: int = 2  # objects per scene (2 or 3)
    seed: int = 0  # scene generation seed (train and eval streams never share scenes)
    teacher: str | None = None  # sentence-transformers model dir for stage 1; null = the pip all-MiniLM-L6-v2
    teacher_batch_size: int = 256  # texts per teacher forward pass
    ablation: bool = True  # also run stage 2 with k=0 (plain in-batch InfoNCE) and evaluate it
    # UniME tunes a pretrained MLLM; the demo's backbone is random, so it is first aligned on the
    # image-caption pairs with plain in-batch InfoNCE, a stand-in for that pretraining.
    pretrain: Stage2Section | None = (
        None  # alignment warm-up before stage 1: a stage-2 section, e.g. with loss.k 0
    )

    def __post_init__(self) -> None:
        if self.train_scenes < 1 or self.eval_scenes < 1:
            raise ValueError(f"scene counts must be positive, got {self.train_scenes} / {self.eval_scenes}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 to draw the shapes, got {self.image_size}")
        if self.num_objects not in (2, 3):
            raise ValueError(f"num_objects must be 2 or 3, got {self.num_objects}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if self.teacher_batch_size < 1:
            raise ValueError(f"teacher_batch_size must be positive, got {self.teacher_batch_size}")

"""Random token batches in the layouts the stage tasks take (query/target, anchor/positive/negative)."""

from __future__ import annotations

import numpy as np

from helpers import hf_models

T = 12


def _texts(rng: np.random.Generator, rows: int, prefix: str) -> dict[str, np.ndarray]:
    lengths = rng.integers(3, T + 1, size=rows)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(3, hf_models.VOCAB, size=(rows, T)).astype(np.int32) * mask
    return {f"{prefix}_input_ids": ids, f"{prefix}_attention_mask": mask}


def stage2_batch(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {**_texts(rng, rows, "query"), **_texts(rng, rows, "target")}


def stage1_batch(rows: int, seed: int, teacher_dim: int = 24) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = {}
    for group in ("anchor", "positive", "negative"):
        batch.update(_texts(rng, rows, group))
        batch[f"teacher_{group}"] = rng.standard_normal((rows, teacher_dim)).astype(np.float32)
    return batch


def fixed_batch_losses(trainer, mesh, steps: int = 6) -> tuple[object, list[float]]:
    """`steps` steps from a fresh state, one fixed stage-2 batch of 16 alternating with new ones:
    (the final state, the losses on the fixed batch), which fall when the model learns."""
    from unime_jax.sharding import global_batch

    state = trainer.init_state(seed=0)
    fixed = global_batch(stage2_batch(16, 5), mesh)
    losses = []
    for step in range(steps):
        batch = fixed if step % 2 == 0 else global_batch(stage2_batch(16, 100 + step), mesh)
        state, metrics = trainer.step(state, batch)
        if step % 2 == 0:
            losses.append(float(metrics["loss"]))
    return state, losses


def stage2_trainer(model, mesh, chunks: int = 2):
    """A stage-2 trainer (k=4, GradCache over `chunks`, lr 3e-3 for 10 steps) over `model`."""
    from unime_jax.training.optimizer import OptimizerConfig
    from unime_jax.training.sections import StageSection
    from unime_jax.training.tasks import Stage2Config, Stage2Task
    from unime_jax.training.trainer import Trainer

    stage = StageSection(grad_chunks=chunks, optimizer=OptimizerConfig(learning_rate=3e-3))
    return Trainer(model, Stage2Task(Stage2Config(k=4)), stage, total_steps=10, mesh=mesh)

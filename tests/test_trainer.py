"""The train step: GradCache equals plain backprop, uses less memory, compiles once, skips NaNs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import hf_models
from helpers.batches import fixed_batch_losses, stage1_batch, stage2_batch

from unime_jax.conversion import load_hf_model
from unime_jax.sharding import global_batch, make_mesh
from unime_jax.training.gradcache import direct_value_and_grad, gradcache_value_and_grad
from unime_jax.training.optimizer import OptimizerConfig
from unime_jax.training.sections import StageSection
from unime_jax.training.tasks import Stage1Config, Stage1Task, Stage2Config, Stage2Task
from unime_jax.training.trainer import Trainer


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return hf_models.mistral(tmp_path_factory.mktemp("trainer") / "mistral")


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(data=-1)


def _trainer(path, mesh, task, chunks=1, **opt):
    model = load_hf_model(path, mesh, progress=False).model
    stage = StageSection(grad_chunks=chunks, optimizer=OptimizerConfig(**opt))
    return Trainer(model, task, stage, total_steps=10, mesh=mesh)


def test_gradcache_gradients_equal_direct_backprop(mistral_dir, mesh):
    trainer = _trainer(mistral_dir, mesh, Stage2Task(Stage2Config(k=4)))
    batch = global_batch(stage2_batch(16, 0), mesh)
    groups = trainer.task.groups(batch)
    key = jax.random.PRNGKey(3)
    loss_fn = lambda emb: trainer.task.loss(emb, batch)  # noqa: E731
    embed = trainer.embed_fn(trainer.frozen)
    with jax.set_mesh(mesh):
        (loss_d, _), grads_d = jax.jit(lambda p: direct_value_and_grad(embed, loss_fn, p, groups, key, 4))(
            trainer.params
        )
        (loss_g, _), grads_g = jax.jit(lambda p: gradcache_value_and_grad(embed, loss_fn, p, groups, key, 4))(
            trainer.params
        )
    np.testing.assert_allclose(loss_g, loss_d, rtol=1e-6)
    flat_d, flat_g = jax.tree.leaves(grads_d), jax.tree.leaves(grads_g)
    assert len(flat_d) == len(flat_g) > 0
    assert max(float(jnp.abs(g).max()) for g in flat_d) > 1e-4, "gradients should not be trivially zero"
    for d, g in zip(flat_d, flat_g, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(d), atol=1e-5, rtol=1e-4)


def test_gradcache_replays_the_dropout_masks_on_a_sharded_mesh(mistral_dir, mesh):
    """LoRA dropout (rbg masks) on 8 devices: the cache pass and the recompute draw the same masks,
    so GradCache's gradients equal plain backprop's, and another step key gives other gradients."""
    from flax import nnx

    from unime_jax.backbones import spec_for
    from unime_jax.models import lora

    loaded = load_hf_model(mistral_dir, mesh, progress=False)
    targets = spec_for(loaded.spec.model_type).lora_targets(loaded.config)
    lora.apply_lora(loaded.model, lora.LoRAConfig(4, 8.0, 0.5, targets), nnx.Rngs(0))
    for path, value in nnx.iter_graph(loaded.model):  # non-zero B, so that the masks matter
        if len(path) > 1 and path[-2] == "lora_B" and isinstance(value, nnx.Variable):
            value[...] = 0.1 * jax.random.normal(jax.random.PRNGKey(len(path)), value.shape)
    trainer = Trainer(loaded.model, Stage2Task(Stage2Config(k=4)), StageSection(), total_steps=1, mesh=mesh)
    batch = global_batch(stage2_batch(16, 0), mesh)
    groups = trainer.task.groups(batch)
    loss_fn = lambda emb: trainer.task.loss(emb, batch)  # noqa: E731
    embed = trainer.embed_fn(trainer.frozen)

    def grads(fn, key: int) -> list[np.ndarray]:
        step = jax.jit(lambda p: fn(embed, loss_fn, p, groups, jax.random.PRNGKey(key), 4)[1])
        with jax.set_mesh(mesh):
            return [np.asarray(g) for g in jax.tree.leaves(step(trainer.params))]

    cached, direct = grads(gradcache_value_and_grad, 3), grads(direct_value_and_grad, 3)
    for g, d in zip(cached, direct, strict=True):
        np.testing.assert_allclose(g, d, atol=1e-5, rtol=1e-4)
    other = grads(gradcache_value_and_grad, 4)
    assert max(float(np.abs(g - o).max()) for g, o in zip(cached, other, strict=True)) > 1e-4


def test_gradcache_needs_less_peak_memory(mistral_dir, mesh):
    """Batch 256 in 8 chunks: the compiled GradCache step needs less temporary memory than direct."""
    single = make_mesh(devices=jax.devices()[:1])
    trainer = _trainer(mistral_dir, single, Stage2Task(Stage2Config()))
    batch = global_batch(stage2_batch(256, 1), single)
    groups = trainer.task.groups(batch)
    loss_fn = lambda emb: trainer.task.loss(emb, batch)  # noqa: E731
    embed = trainer.embed_fn(trainer.frozen)
    key = jax.random.PRNGKey(0)

    def temp_bytes(fn, chunks):
        lowered = jax.jit(lambda p: fn(embed, loss_fn, p, groups, key, chunks)).lower(trainer.params)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    cached, direct = temp_bytes(gradcache_value_and_grad, 8), temp_bytes(direct_value_and_grad, 1)
    assert cached < direct / 2, (cached, direct)


def test_train_step_compiles_once_and_learns(mistral_dir, mesh):
    trainer = _trainer(mistral_dir, mesh, Stage2Task(Stage2Config(k=4)), chunks=2, learning_rate=3e-3)
    state, losses = fixed_batch_losses(trainer, mesh)
    assert trainer._step_fn._cache_size() == 1
    assert int(state.step) == 6
    assert losses[-1] < losses[0], losses
    kernel = state.params["model"]["layers"][0]["mlp"]["down_proj"]["kernel"][...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None)  # data-parallel mesh: replicated


def test_nonfinite_step_is_skipped_and_counted(mistral_dir, mesh):
    trainer = _trainer(mistral_dir, mesh, Stage1Task(Stage1Config()))
    state = trainer.init_state(seed=0)
    before = jax.tree.map(np.asarray, state.params)
    bad = stage1_batch(8, 0)
    bad["teacher_anchor"][0, 0] = np.nan
    state, metrics = trainer.step(state, global_batch(bad, mesh))
    assert float(metrics["finite"]) == 0.0
    assert int(state.skipped) == 1 and int(state.nonfinite_run) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)
    state, metrics = trainer.step(state, global_batch(stage1_batch(8, 1), mesh))
    assert float(metrics["finite"]) == 1.0 and int(state.nonfinite_run) == 0 and int(state.skipped) == 1


def test_checkpoint_from_another_model_is_refused(mistral_dir, mesh, tmp_path):
    from unime_jax.training.checkpoints import CheckpointMismatchError, Checkpoints

    trainer = _trainer(mistral_dir, mesh, Stage2Task(Stage2Config(k=4)))
    state = trainer.init_state(seed=0)
    def checkpoints(rank: int) -> Checkpoints:
        identity = {"model": "tiny-mistral", "lora_rank": rank}
        return Checkpoints(tmp_path / "ckpt", identity, {"seed": 0}, keep=2, async_save=False)

    ckpts = checkpoints(16)
    ckpts.save(1, state)
    ckpts.wait()
    with pytest.raises(CheckpointMismatchError, match=r"lora_rank: checkpoint 16 vs now 32"):
        checkpoints(32).restore(1, state)
    restored = ckpts.restore(1, state)
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.tree.map(np.asarray, restored.params),
        jax.tree.map(np.asarray, state.params),
    )
    ckpts.close()


def test_the_loop_sends_batch_k_plus_1_before_reading_step_ks_metrics(mistral_dir, mesh, tmp_path):
    """The next batch is read and sent while a step runs; each checkpoint's iterator stands at its step."""
    import grain

    from unime_jax.training import loop
    from unime_jax.training.checkpoints import Checkpoints
    from unime_jax.training.metrics import MetricsWriter

    events: list[str] = []

    def batch(k: int) -> dict:
        events.append(f"read {k}")
        return stage2_batch(16, 100 + k)

    def batches() -> grain.DatasetIterator:
        synchronous = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # reads happen at next()
        return iter(grain.MapDataset.range(100).map(batch).to_iter_dataset(synchronous))

    class Recording(MetricsWriter):
        def write(self, step: int, values: dict, prefix: str = "train") -> None:
            events.append(f"metrics {step}")
            super().write(step, values, prefix)

    model = load_hf_model(mistral_dir, mesh, progress=False).model
    stage = StageSection(grad_chunks=2, save_every=2, log_every=1, optimizer=OptimizerConfig())
    trainer = Trainer(model, Stage2Task(Stage2Config(k=4)), stage, total_steps=5, mesh=mesh)
    checkpoints = Checkpoints(tmp_path / "ckpt", {"t": 1}, {}, keep=5)
    writer = Recording(tmp_path, enabled=False)
    loop.run(trainer, trainer.init_state(seed=0), batches(), writer, checkpoints=checkpoints)
    assert events == [
        "read 0", "read 1", "metrics 1",  # batch 1 is on its way before step 1's metrics are read
        "metrics 2", "read 2",  # ... except at a save (step 2), where it is read after the checkpoint
        "read 3", "metrics 3", "metrics 4", "read 4", "metrics 5",
    ]
    for step in (2, 4):
        resumed = batches()
        checkpoints.restore(step, trainer.init_state(seed=0), resumed)
        expected = stage2_batch(16, 100 + step)["query_input_ids"]
        np.testing.assert_array_equal(next(resumed)["query_input_ids"], expected)
    checkpoints.close()

"""The jitted train step: trainable/frozen split, GradCache, optimizer, non-finite skipping.

The model is split once into trainable parameters (LoRA adapters, or every Param for full
fine-tuning) and everything else (frozen base weights, RNG state). Only the trainable part and
its optimizer state are in the train state, so optimizer memory exists only for what is trained.
The step is jitted with explicit in/out shardings and a donated state: one compile, then reuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unime_jax.models import lora, pooling
from unime_jax.sharding import shard_state
from unime_jax.training.gradcache import EmbedFn, direct_value_and_grad, gradcache_value_and_grad
from unime_jax.training.optimizer import OptimizerConfig, make_optimizer
from unime_jax.training.tasks import Batch, Task


@struct.dataclass
class TrainState:
    step: jax.Array  # batches consumed (int32)
    params: Any  # trainable nnx.State
    opt_state: Any
    rng: jax.Array  # raw uint32 PRNG key; step keys are fold_in(rng, step)
    nonfinite_run: jax.Array  # consecutive steps skipped for NaN/inf
    skipped: jax.Array  # steps skipped in total


def _path_key(path: tuple) -> str:
    return jax.tree_util.keystr(path)


def like_params_shardings(tree: Any, params: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer-state tree: leaves mirroring a parameter share its sharding."""
    by_path = {_path_key(p): (x.shape, x.sharding) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path: tuple, leaf: Any) -> NamedSharding:
        key = _path_key(path)
        for param_path, (shape, sharding) in by_path.items():
            if key.endswith(param_path) and tuple(leaf.shape) == tuple(shape):
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


@dataclass(frozen=True)
class TrainerConfig:
    """Step-level choices."""

    grad_chunks: int = 1  # GradCache chunks per group; 1 = plain backprop through the whole batch
    max_nonfinite: int = 5  # stop after this many consecutive NaN/inf steps


class Trainer:
    """Owns the split model, the optimizer and the compiled step."""

    def __init__(
        self,
        model: nnx.Module,
        task: Task,
        optimizer: OptimizerConfig,
        total_steps: int,
        mesh: Mesh,
        cfg: TrainerConfig = TrainerConfig(),
    ):
        self.task, self.mesh, self.cfg = task, mesh, cfg
        self.graphdef, params, self.frozen = nnx.split(model, lora.trainable_filter(model), ...)
        self.params = shard_state(params, mesh)
        self.tx, self.schedule = make_optimizer(optimizer, total_steps)
        self.accumulation = optimizer.accumulation_steps
        self._step_fn = None

    # ----------------------------------------------------------------------------------------
    def embed_fn(self, frozen: Any) -> EmbedFn:
        """(trainable params, model inputs, dropout key) -> L2-normalised last-token embeddings."""

        def embed(params: Any, inputs: dict[str, jax.Array], key: jax.Array) -> jax.Array:
            # Fresh variables (copy=True): remat and dropout write to the model inside this trace.
            model = nnx.merge(self.graphdef, params, lora.lora_dropout_keys(frozen, key), copy=True)
            return pooling.embed(model(**inputs), inputs["attention_mask"])

        return embed

    def init_state(self, seed: int) -> TrainState:
        opt_state = jax.jit(self.tx.init)(self.params)
        opt_state = jax.device_put(opt_state, like_params_shardings(opt_state, self.params, self.mesh))
        # Distinct buffers for every field: the state is donated, and a buffer donated twice is an error.
        replicated = NamedSharding(self.mesh, PartitionSpec())
        scalar = lambda: jax.device_put(jnp.zeros((), jnp.int32), replicated)  # noqa: E731
        rng = jax.device_put(jax.random.PRNGKey(seed), replicated)
        params = jax.tree.map(jnp.copy, self.params)
        return TrainState(scalar(), params, opt_state, rng, scalar(), scalar())

    def state_shardings(self, state: TrainState) -> Any:
        return jax.tree.map(lambda x: x.sharding, state)

    # ----------------------------------------------------------------------------------------
    def _step(self, state: TrainState, frozen: Any, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(state.rng, state.step)
        groups = self.task.groups(batch)
        loss_fn = lambda emb: self.task.loss(emb, batch)  # noqa: E731
        grad_fn = gradcache_value_and_grad if self.cfg.grad_chunks > 1 else direct_value_and_grad
        (loss, metrics), grads = grad_fn(
            self.embed_fn(frozen), loss_fn, state.params, groups, key, self.cfg.grad_chunks
        )
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            rng=state.rng,
            nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = dict(metrics)
        metrics.update(
            loss=loss,
            grad_norm=grad_norm,
            lr=self.schedule(state.step // self.accumulation),
            finite=finite.astype(jnp.float32),
        )
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    def compile(self, state: TrainState, batch: Batch):
        """jit with explicit shardings and a donated state; batches must keep these shapes."""
        state_sh = self.state_shardings(state)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        metrics_sh = jax.tree.map(
            lambda _: replicated, jax.eval_shape(self._step, state, self.frozen, batch)[1]
        )
        return jax.jit(
            self._step,
            in_shardings=(
                state_sh,
                jax.tree.map(lambda x: x.sharding, self.frozen),
                jax.tree.map(lambda x: x.sharding, batch),
            ),
            out_shardings=(state_sh, metrics_sh),
            donate_argnums=(0,),
        )

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        if self._step_fn is None:
            self._step_fn = self.compile(state, batch)
        with jax.set_mesh(self.mesh):
            return self._step_fn(state, self.frozen, batch)

    def model(self, state: TrainState) -> nnx.Module:
        """The model with the state's trained parameters (for evaluation and export)."""
        return nnx.merge(self.graphdef, state.params, self.frozen)

"""The jitted train step: trainable/frozen split, GradCache, optimizer, non-finite skipping.

The model is split once into trainable parameters (LoRA adapters, or every Param for full
fine-tuning) and everything else (frozen base weights, RNG state). Only the trainable part and
its optimizer state are in the train state, so optimizer memory exists only for what is trained.
The step is jitted with explicit in/out shardings and a donated state: one compile, then reuse.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unime_jax.models import lora, pooling
from unime_jax.sharding import shard_state
from unime_jax.training.gradcache import EmbedFn, direct_value_and_grad, gradcache_value_and_grad
from unime_jax.training.metrics import lm_flops_per_token, peak_flops
from unime_jax.training.optimizer import make_optimizer
from unime_jax.training.packed import PackedEmbedder, is_packed
from unime_jax.training.sections import StageSection
from unime_jax.training.tasks import Batch, Task


@struct.dataclass
class TrainState:
    step: jax.Array  # batches consumed (int32)
    params: Any  # trainable nnx.State
    opt_state: Any
    rng: jax.Array  # raw uint32 PRNG key; step keys are fold_in(rng, step)
    nonfinite_run: jax.Array  # consecutive steps skipped for NaN/inf
    skipped: jax.Array  # steps skipped in total


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, mesh: Mesh) -> Any:
    """Shardings of ``tx.init(params)``: each subtree shaped like the parameters (Adam's moments,
    accumulated gradients) takes the parameters' shardings; everything else (step counts) is
    replicated. Read off ``jax.eval_shape`` of the init, so no state is allocated to find them."""
    abstract = jax.eval_shape(tx.init, params)
    params_def = jax.tree.structure(params)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    replicated = NamedSharding(mesh, PartitionSpec())

    def like_params(node: Any) -> bool:
        return jax.tree.structure(node) == params_def

    return jax.tree.map(
        lambda node: param_shardings if like_params(node) else replicated, abstract, is_leaf=like_params
    )


def embed_fn(graphdef: nnx.GraphDef, frozen: Any) -> EmbedFn:
    """The training forward of a split model: (trainable params, model inputs, dropout key) ->
    L2-normalised last-token embeddings, with the key's LoRA dropout masks."""

    def embed(params: Any, inputs: dict[str, jax.Array], key: jax.Array) -> jax.Array:
        # Fresh variables (copy=True): remat and dropout write to the model inside this trace.
        model = nnx.merge(graphdef, params, lora.lora_dropout_keys(frozen, key), copy=True)
        return pooling.embed(model(**inputs), inputs["attention_mask"])

    return embed


class Trainer:
    """Owns the split model, the optimizer and the compiled step of one stage.

    Args:
      stage: the stage's settings: ``optimizer``, ``grad_chunks`` (GradCache chunks per group; 1 =
        plain backprop through the whole batch), ``max_nonfinite`` (consecutive NaN/inf steps
        before the run stops), ``save_every``/``log_every`` (the loop's), ``peak_tflops`` (MFU).
      total_steps: steps of the run (the learning-rate schedule's length).
    """

    def __init__(self, model: nnx.Module, task: Task, stage: StageSection, total_steps: int, mesh: Mesh):
        self.task, self.stage, self.total_steps, self.mesh = task, stage, total_steps, mesh
        trainable, total = lora.param_counts(model)
        self.flops_per_token = lm_flops_per_token(total - trainable, trainable, stage.grad_chunks > 1)
        self.peak_flops = peak_flops(stage.peak_tflops)
        self.has_vision = hasattr(model, "tile_features")  # a multimodal backbone (the packed layout asks)
        self.graphdef, params, self.frozen = nnx.split(model, lora.trainable_filter(model), ...)
        self.params = shard_state(params, mesh)
        self.tx, self.schedule = make_optimizer(stage.optimizer, total_steps)
        self.accumulation = stage.optimizer.accumulation_steps
        self._step_fn = None

    # ----------------------------------------------------------------------------------------
    def embed_fn(self, frozen: Any) -> EmbedFn:
        """(trainable params, model inputs, dropout key) -> L2-normalised last-token embeddings."""
        return embed_fn(self.graphdef, frozen)

    def packed_embedder(self, frozen: Any) -> PackedEmbedder:
        """The packed layout's passes; the vision parts are the model's own (absent for a text LM)."""

        def merged(params: Any) -> nnx.Module:
            return nnx.merge(self.graphdef, params, frozen, copy=True)

        vision = self.has_vision
        return PackedEmbedder(
            self.embed_fn(frozen),
            (lambda p, tiles: merged(p).tile_features(tiles)) if vision else None,
            (lambda p, length, **rows: merged(p).feature_index(length, **rows)) if vision else None,
            self.stage.layout.tile_chunk,
        )

    def init_state(self, seed: int) -> TrainState:
        shardings = opt_state_shardings(self.tx, self.params, self.mesh)
        opt_state = jax.jit(self.tx.init, out_shardings=shardings)(self.params)
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
        loss_fn = lambda emb: self.task.loss(emb, batch)  # noqa: E731
        gradcache = self.stage.grad_chunks > 1
        if is_packed(batch):
            (loss, metrics), grads = self.packed_embedder(frozen).value_and_grad(
                loss_fn, state.params, batch, key, gradcache=gradcache
            )
        else:
            grad_fn = gradcache_value_and_grad if gradcache else direct_value_and_grad
            (loss, metrics), grads = grad_fn(
                self.embed_fn(frozen),
                loss_fn,
                state.params,
                self.task.groups(batch),
                key,
                self.stage.grad_chunks,
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

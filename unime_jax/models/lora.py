"""LoRA inside our `Linear` layers: regex targeting, merging, trainable filters.

Which modules a backbone adapts is its spec's (``BackboneSpec.lora_targets``); the rank, alpha
and dropout of each UniME stage are the run config's (``configs/stage{1,2}_common.yaml``).

An adapted `Linear` at module path P gains children named as PEFT names them, so the PEFT export
is the usual conversion rule (rename `kernel` -> `weight`, transpose):

    P.lora_A.kernel  (in, r)   nnx.LoRAParam               PEFT P.lora_A.weight (r, in)
    P.lora_B.kernel  (r, out)  nnx.LoRAParam, zero-init    PEFT P.lora_B.weight (out, r)
    P.lora_dropout             nnx.Dropout with its own RNG stream (only when dropout > 0)

    y = x @ W + b + lora_B(lora_A(dropout(x))) * alpha / r

DoRA (`LoRAConfig.variant="dora"`, PEFT's `use_dora=True`) adds one more PEFT-named parameter:

    P.lora_magnitude_vector  (out,)  nnx.LoRAParam     PEFT P.lora_magnitude_vector (out,)

initialised to the column norms of W, and the layer becomes g * (x @ W + update) + b with
g = magnitude / ||W + A @ B * alpha / r||_col (`Linear.dora_gain`); merging writes g * (W + A @ B * alpha / r).
`LoRAConfig.init="gaussian"` draws A from a normal with std 1/r, as PEFT's `init_lora_weights="gaussian"`.

QLoRA (`LoRAConfig.quantize_base="nf4"`): each adapted Linear's frozen kernel is replaced by its
NF4 codes and block scales (`models.nf4`, through qwix), dequantized where the layer runs; the
adapters are unchanged. Merging writes dequantized W + A @ B * alpha / r back as a plain `kernel`
in the base's dtype, so a merged QLoRA model exports as an ordinary (bf16) HF directory.

The frozen base keeps its dtype (bf16 in training); the adapters are stored in
`LoRAConfig.param_dtype` (fp32) and computed in the Linear's compute dtype.

Training: `nnx.state(model, nnx.LoRAParam)` is exactly the adapters, so
`nnx.split(model, nnx.LoRAParam, ...)` gives (trainable, frozen) and an optimizer over the first
holds state for the adapters only. Without adapters (full fine-tuning) the trainable filter is
`nnx.Param` (see `trainable_filter`).

Dropout randomness: every `lora_dropout` owns an `nnx.RngStream` tagged `LORA_DROPOUT`, whose
`RngKey`/`RngCount` variables live in the model state (the frozen part of the split). A dropout
call draws `fold_in(key, count)` and increments `count`, so a forward pass is a pure function of
the streams' (key, count) values. The training step overwrites them before every forward with
`lora_dropout_keys(frozen, key)`: stream i gets (fold_in(rbg(key), i), count 0), an ``rbg`` key
(XLA's RngBitGenerator), which draws masks far more cheaply than threefry. GradCache passes the
same per-chunk key (e.g. fold_in(step key, chunk)) to its no-grad pass and to its recompute pass,
so both draw identical masks; remat replays them as well, since the masks depend only on those
inputs. Do it functionally, inside the traced function:

    def embed(params, frozen, inputs, key):
        model = nnx.merge(graphdef, params, lora_dropout_keys(frozen, key), copy=True)
        return model(**inputs)

Why functionally and why `copy=True`: `nnx.merge` otherwise reuses the state's Variable objects,
and NNX refuses to mutate a Variable created outside the current trace (TraceContextError). A
dropout call bumps its count, and the decoder's `nnx.remat` writes every layer variable back, so
a state closed over from an outer trace (jit -> grad/vjp/checkpoint) fails without fresh
Variables. Eagerly (or under nnx transforms) `reseed_lora_dropout(model, key)` sets the same
keys in place. Evaluation skips dropout: `nnx.view(model, deterministic=True, raise_if_not_found=False)`
(or `model.eval()`); without dropout (rate 0) the model has no RNG state at all.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from unime_jax.models import nf4
from unime_jax.models.layers import Linear

# Tag of the adapters' dropout RNG streams (`lora_dropout_keys` resets only these).
LORA_DROPOUT = "lora_dropout"
_ADAPTER_ATTRS = ("lora_A", "lora_B", "lora_scale", "lora_dropout", "lora_magnitude_vector")
VARIANTS = ("lora", "dora")
INITS = ("default", "gaussian")
BASE_QUANTIZATIONS = ("none", "nf4")

# PEFT's default LoRA init: A ~ kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(in)); B = 0, so a new
# adapter leaves the model's output unchanged.
_A_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
_B_INIT = nnx.initializers.zeros


def _gaussian_a_init(rank: int):
    """PEFT's `init_lora_weights="gaussian"`: A ~ N(0, (1/r)^2), B = 0."""
    return nnx.initializers.normal(1.0 / rank)


@dataclass(frozen=True)
class LoRAConfig:
    """Which Linears get adapters and their hyper-parameters."""

    rank: int  # r
    alpha: float  # the update is scaled by alpha / r
    dropout: float  # dropout on the adapter input (training only)
    targets: str  # regex re.fullmatch-ed against dotted module paths, e.g. model\.layers\.\d+\.mlp\.down_proj
    param_dtype: str = "float32"  # storage dtype of lora_A / lora_B (and DoRA's magnitude)
    variant: str = "lora"  # "lora", or "dora" (PEFT use_dora=True: a trained magnitude per output)
    init: str = "default"  # lora_A's init: "default" (PEFT's kaiming-uniform) or "gaussian" (std 1/r)
    quantize_base: str = "none"  # "nf4": QLoRA, the adapted Linears' frozen kernels stored as NF4

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.variant not in VARIANTS:
            raise ValueError(f"LoRA variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.init not in INITS:
            raise ValueError(f"LoRA init must be one of {INITS}, got {self.init!r}")
        if self.quantize_base not in BASE_QUANTIZATIONS:
            raise ValueError(
                f"LoRA quantize_base must be one of {BASE_QUANTIZATIONS}, got {self.quantize_base!r}"
            )
        try:
            re.compile(self.targets)
        except re.error as err:
            raise ValueError(f"LoRA targets {self.targets!r} is not a valid regex: {err}") from err

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# --------------------------------------------------------------------------------------------
# Adding, finding and merging adapters


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _is_adapted(linear: Linear) -> bool:
    return hasattr(linear, "lora_A")


def _linears(model: nnx.Module) -> Iterator[tuple[str, Linear]]:
    """(dotted path, Linear) for every base Linear; the adapters' own factors are not candidates."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and not isinstance(getattr(node, "kernel", None), nnx.LoRAParam):
            yield _dotted(path), node


def lora_modules(model: nnx.Module) -> list[tuple[str, Linear]]:
    """(dotted path, Linear) of every Linear that carries an adapter."""
    return [(path, linear) for path, linear in _linears(model) if _is_adapted(linear)]


def _dropout_stream(rngs: nnx.Rngs) -> nnx.RngStream:
    # A `lora_dropout` stream in `rngs` seeds the masks; otherwise they derive from `params`.
    # Either way the training step reseeds before every forward (module docstring).
    if LORA_DROPOUT in rngs:
        return rngs[LORA_DROPOUT]
    return nnx.RngStream(rngs.params(), tag=LORA_DROPOUT)


def _quantize_base(linear: Linear) -> None:
    """Replace the frozen kernel by its NF4 codes and block scales (QLoRA), with its logical axes."""
    axes = linear.kernel.get_metadata().get("logical_axes")
    codes, scales = nf4.quantize(linear.kernel.get_value())
    del linear.kernel
    linear.kernel_nf4 = nf4.NF4Param(codes, logical_axes=axes)
    # The scales' rows are the input blocks, in order: split over the same mesh axis they stay
    # beside their codes' shard. Where the block count does not divide (e.g. 4304 / 16 = 269 rows
    # for SigLIP-SO400M's fc2), `sharding.logical_to_spec` leaves that axis replicated.
    linear.kernel_nf4_scale = nf4.NF4Param(scales, logical_axes=axes)


def _dequantize_base(linear: Linear, kernel: jax.Array) -> None:
    """Store `kernel` (float32) as the plain kernel again, in the NF4 base's dtype; drop the codes."""
    axes = linear.kernel_nf4.get_metadata().get("logical_axes")
    dtype = linear.kernel_nf4_scale.get_value().dtype
    del linear.kernel_nf4, linear.kernel_nf4_scale
    linear.kernel = nnx.Param(kernel.astype(dtype), logical_axes=axes)


def _add_adapter(linear: Linear, cfg: LoRAConfig, rngs: nnx.Rngs, dropout: nnx.RngStream | None) -> None:
    d_in, d_out = linear.kernel.get_value().shape
    ax_in, ax_out = linear.kernel.get_metadata().get("logical_axes") or (None, None)
    if cfg.quantize_base == "nf4":
        _quantize_base(linear)
    factor = {
        "use_bias": False,
        "dtype": linear.dtype,
        "param_dtype": jnp.dtype(cfg.param_dtype),
        "kernel_type": nnx.LoRAParam,
        "rngs": rngs,
    }
    a_init = _gaussian_a_init(cfg.rank) if cfg.init == "gaussian" else _A_INIT
    linear.lora_A = Linear(d_in, cfg.rank, axes=(ax_in, "lora_rank"), kernel_init=a_init, **factor)
    linear.lora_B = Linear(cfg.rank, d_out, axes=("lora_rank", ax_out), kernel_init=_B_INIT, **factor)
    linear.lora_scale = cfg.scale
    if cfg.variant == "dora":
        # B = 0, so the adapted weight is W and the gain starts at exactly 1 (PEFT's dora_init).
        norm = jnp.linalg.norm(linear.base_kernel().astype(jnp.float32), axis=0)
        linear.lora_magnitude_vector = nnx.LoRAParam(
            norm.astype(jnp.dtype(cfg.param_dtype)), logical_axes=(ax_out,)
        )
    if dropout is not None:
        # Dropout forks the stream, so each adapter has its own (key, count) and its own masks.
        linear.lora_dropout = nnx.Dropout(cfg.dropout, rng_collection=LORA_DROPOUT, rngs=dropout)


def apply_lora(model: nnx.Module, cfg: LoRAConfig, rngs: nnx.Rngs) -> list[str]:
    """Add adapters to every Linear whose dotted path fullmatches `cfg.targets`; returns those paths.

    `rngs.params` initialises lora_A. Raises if the regex matches no Linear or matches one that
    already has an adapter (merge it first, as UniME does between its stages).
    """
    pattern = re.compile(cfg.targets)
    candidates = list(_linears(model))
    chosen = [(path, linear) for path, linear in candidates if pattern.fullmatch(path)]
    if not chosen:
        examples = ", ".join(path for path, _ in candidates[:4])
        raise ValueError(
            f"LoRA targets regex {cfg.targets!r} matches no Linear module (re.fullmatch on dotted "
            f"paths such as {examples})"
        )
    adapted = [path for path, linear in chosen if _is_adapted(linear)]
    if adapted:
        raise ValueError(
            f"{len(adapted)} module(s) already have LoRA adapters (merge_lora first): {adapted[:4]}"
        )
    dropout = _dropout_stream(rngs) if cfg.dropout > 0 else None
    for _, linear in chosen:
        _add_adapter(linear, cfg, rngs, dropout)
    return [path for path, _ in chosen]


def _strip_adapter(linear: Linear) -> None:
    for name in _ADAPTER_ATTRS:
        if hasattr(linear, name):
            delattr(linear, name)


def merge_lora(model: nnx.Module) -> list[str]:
    """Fold every adapter into its base kernel and remove it; returns the merged module paths.

    W <- W + A @ B * scale (DoRA: times the gain, magnitude / its column norm), computed in fp32
    (at full matmul precision, so GPUs do not use TF32) and cast to W's dtype once (QLoRA: W is
    the dequantized NF4 base, and the result a plain kernel in the base's dtype). Afterwards the
    model's state and graph equal the base model's, so `convert.export_hf` writes plain merged HF
    weights.
    """
    merged = lora_modules(model)
    for _, linear in merged:
        kernel = linear.adapted_kernel()
        if hasattr(linear, "lora_magnitude_vector"):
            kernel = kernel * linear.dora_gain()
        if hasattr(linear, "kernel_nf4"):
            _dequantize_base(linear, kernel)
        else:
            linear.kernel.set_value(kernel.astype(linear.kernel.get_value().dtype))
        _strip_adapter(linear)
    return [path for path, _ in merged]


# --------------------------------------------------------------------------------------------
# Training helpers


def has_lora(model: nnx.Module) -> bool:
    return bool(nnx.state(model, nnx.LoRAParam))


def trainable_filter(model: nnx.Module) -> type[nnx.Param]:
    """What the optimizer trains: the adapters when there are any, else every parameter (full fine-tune)."""
    return nnx.LoRAParam if has_lora(model) else nnx.Param


def param_counts(model: nnx.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; total includes the adapters."""

    def count(state: nnx.State) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(state))

    return count(nnx.state(model, trainable_filter(model))), count(nnx.state(model, nnx.Param))


def _as_key(key: jax.Array | int) -> jax.Array:
    if isinstance(key, int):
        return jax.random.key(key)
    return key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def _mask_key(key: jax.Array) -> jax.Array:
    """An ``rbg`` key drawn from a threefry (or rbg) `key`, for the dropout masks.

    A mask is one random bit pattern per activation: 7 adapters per layer, drawn again in
    GradCache's recompute and in remat's replay. threefry computes each 32 random bits with about
    20 rounds of integer arithmetic; ``rbg`` takes them from XLA's RngBitGenerator (Philox on GPU),
    a fraction of that work. Its bits are not portable across backends or shardings, but within
    one compiled step the same key and shape give the same bits, so every pass over a chunk draws
    the same masks (``tests/test_trainer.py`` checks GradCache against plain backprop on 8
    devices). The step's own key stays a threefry key (checkpoints keep their layout).
    """
    if str(jax.random.key_impl(key)) == "rbg":
        return key
    # Two threefry keys are the 4 words of an rbg key.
    halves = jax.random.key_data(jax.random.split(key))
    return jax.random.wrap_key_data(halves.reshape(-1).astype(jnp.uint32), impl="rbg")


def lora_dropout_keys(state: nnx.State, key: jax.Array | int) -> nnx.State:
    """Copy of `state` whose LoRA dropout stream i is (fold_in(rbg(key), i), count 0), as new Variables.

    `key`: an int, a typed key or raw uint32 key data. Other variables are passed through. The
    streams draw their masks with the ``rbg`` generator (:func:`_mask_key`).
    """
    key = _mask_key(_as_key(key))
    index = itertools.count()

    def fresh(var: nnx.Variable) -> nnx.Variable:
        if isinstance(var, nnx.RngKey) and var.tag == LORA_DROPOUT:
            return var.replace(jax.random.fold_in(key, next(index)))
        if isinstance(var, nnx.RngCount) and var.tag == LORA_DROPOUT:
            return var.replace(jnp.zeros_like(var.get_value()))
        return var

    return jax.tree.map(fresh, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def reseed_lora_dropout(model: nnx.Module, key: jax.Array | int) -> None:
    """In-place `lora_dropout_keys`: the next forward's masks become a function of `key` alone."""
    nnx.update(model, lora_dropout_keys(nnx.state(model, nnx.RngState), key))

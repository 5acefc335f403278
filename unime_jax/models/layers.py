"""Basic NNX layers whose parameter names and layouts make HF conversion a rename plus transpose.

Every parameter carries `logical_axes` metadata (one name per dimension). `unime_jax.sharding`
maps those names to mesh axes through a single rules table, so the layers never name mesh axes.

Naming: linear kernels are `kernel` stored (in, out) (HF `weight` is (out, in)); norms and
embeddings keep HF's `weight`/`bias` names and layouts.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from unime_jax.models import nf4

Axes = tuple[str | None, ...]

_normal = nnx.initializers.normal(0.02)


def param(rngs: nnx.Rngs, init: Callable, shape: tuple[int, ...], dtype: jnp.dtype, axes: Axes) -> nnx.Param:
    """A parameter initialised with `init`, annotated with its logical axes."""
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


class Linear(nnx.Module):
    """y = x @ kernel + bias, computed in `dtype` with parameters stored in `param_dtype`.

    `unime_jax.models.lora.apply_lora` may attach a LoRA adapter under PEFT's names: children
    `lora_A` (in -> r) and `lora_B` (r -> out), Linears whose kernels are `nnx.LoRAParam`, a
    static `lora_scale` (alpha / r) and, when dropout > 0, `lora_dropout`. The output then gains
    lora_B(lora_A(lora_dropout(x))) * lora_scale, as PEFT's LoRA layer computes it.

    A DoRA adapter also has `lora_magnitude_vector` (out,), an `nnx.LoRAParam`: each output column
    of the adapted weight W' = W + A @ B * lora_scale is rescaled to that length (see `dora_gain`).
    Under QLoRA the frozen `kernel` is replaced by its NF4 codes and scales, `kernel_nf4` and
    `kernel_nf4_scale` (`models.nf4`), dequantized where the layer runs.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        axes: Axes,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
        kernel_init: Callable = _normal,
        kernel_type: type[nnx.Param] = nnx.Param,
    ):
        # LoRA factors pass `nnx.LoRAParam`, so that filter selects exactly the adapters.
        shape = (in_features, out_features)
        self.kernel = kernel_type(kernel_init(rngs.params(), shape, param_dtype), logical_axes=axes)
        if use_bias:
            self.bias = param(rngs, nnx.initializers.zeros, (out_features,), param_dtype, (axes[-1],))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = self.base_kernel().astype(self.dtype)
        xw = jnp.dot(x, kernel)
        y = xw
        if hasattr(self, "bias"):
            y = y + self.bias[...].astype(self.dtype)
        if hasattr(self, "lora_A"):
            h = self.lora_dropout(x) if hasattr(self, "lora_dropout") else x
            update = self.lora_B(self.lora_A(h)) * self.lora_scale
            if hasattr(self, "lora_magnitude_vector"):
                # PEFT's DoraLinearLayer: g * (h @ W + update) replaces h @ W, i.e. the layer adds
                # (g - 1) * (h @ W) + g * update. Inactive dropout (eval, rate 0) returns x itself,
                # and then x @ W is reused; an active one needs h @ W, as PEFT recomputes it.
                base = xw if h is x else jnp.dot(h, kernel)
                g = self.dora_gain().astype(self.dtype)
                update = (g - 1) * base + g * update
            y = y + update
        return y

    def base_kernel(self) -> jax.Array:
        """The frozen (in, out) kernel: as stored, or dequantized from NF4 (a QLoRA base, `models.nf4`)."""
        if hasattr(self, "kernel_nf4"):
            return nf4.dequantize(self.kernel_nf4[...], self.kernel_nf4_scale[...])
        return self.kernel[...]

    def adapted_kernel(self) -> jax.Array:
        """W + A @ B * lora_scale in float32 at full matmul precision (GPUs would use TF32)."""
        a = self.lora_A.kernel[...].astype(jnp.float32)
        b = self.lora_B.kernel[...].astype(jnp.float32)
        delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * self.lora_scale
        return self.base_kernel().astype(jnp.float32) + delta

    def dora_gain(self) -> jax.Array:
        """DoRA's per-output factor magnitude / ||W + A @ B * scale||_col, float32, shape (out,).

        The column norm (over the input axis of our (in, out) kernel: PEFT's row norm of the
        (out, in) weight) is held constant for the gradient, as the DoRA paper (section 4.3) and
        PEFT do, so the magnitude and the factors are trained through the gain and the update only.
        """
        norm = jax.lax.stop_gradient(jnp.linalg.norm(self.adapted_kernel(), axis=0))
        return self.lora_magnitude_vector[...].astype(jnp.float32) / norm


class Embed(nnx.Module):
    """Token (or position) embedding table, HF layout (num_embeddings, features)."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        axes: Axes,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.weight = param(rngs, _normal, (num_embeddings, features), param_dtype, axes)
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    """Llama/Mistral/Phi-3 RMSNorm: normalise in float32, cast back, then scale (as HF does)."""

    def __init__(
        self, features: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        self.weight = param(rngs, nnx.initializers.ones, (features,), param_dtype, ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return self.weight[...].astype(self.dtype) * normed


class LayerNorm(nnx.Module):
    """LayerNorm with HF names (`weight`, `bias`); statistics in float32."""

    def __init__(
        self, features: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        self.weight = param(rngs, nnx.initializers.ones, (features,), param_dtype, ("norm",))
        self.bias = param(rngs, nnx.initializers.zeros, (features,), param_dtype, ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        out = normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(self.dtype)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """HF `hidden_act` names -> functions with the same numerics."""
    acts: dict[str, Callable[[jax.Array], jax.Array]] = {
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    }
    if name not in acts:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(acts)}")
    return acts[name]

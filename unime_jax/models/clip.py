"""CLIP ViT vision tower, mirroring HF `CLIPVisionModel` (shared by Phi-3.5-V and LLaVA-NeXT).

Both backbones read hidden_states[-2] (the output of the second-to-last encoder layer) and drop
the CLS token; `hidden_state(pixels, layer)` runs only the layers that output needs.

Pixels come in either of two forms: float pixels already in CLIP space (what HF processors emit),
or uint8 pixels before rescaling and normalisation, which the tower normalises itself with its
config's `image_mean`/`image_std` (a quarter of the bytes to ship to the device).
`normalize_pixels` is the one normalisation both the host processors and the tower use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unime_jax.models.attention import Implementation, attend
from unime_jax.models.layers import Embed, LayerNorm, Linear, activation, param

# The OpenAI CLIP statistics, which the processors of both backbones normalise with.
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

Pixels = TypeVar("Pixels", np.ndarray, jax.Array)


def pixel_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(channels, 256) float32: the normalised value of every uint8 level, per channel.

    float32 arithmetic in torchvision's order (x / 255 − mean) / std; transformers' numpy path
    rescales in float64 first, which differs by at most one float32 ulp.
    """
    levels = np.arange(256, dtype=np.float32)[None] / np.float32(255.0)
    return (levels - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]


def normalize_pixels(pixels: Pixels, mean: Sequence[float], std: Sequence[float]) -> Pixels:
    """uint8 (..., channels, H, W) → float32 in CLIP space, numpy on the host or jax on the device.

    A lookup in :func:`pixel_table`, not arithmetic, so the device gives the host's values bit for
    bit: XLA's float32 division is not correctly rounded on every backend (CPU's is not).
    """
    xp = np if isinstance(pixels, np.ndarray) else jnp
    if pixels.dtype != np.uint8:
        raise TypeError(f"normalize_pixels takes uint8 pixels, got {pixels.dtype}")
    channel = xp.arange(len(mean))[:, None, None]
    return xp.asarray(pixel_table(mean, std))[channel, pixels]


@dataclass(frozen=True)
class CLIPVisionConfig:
    """HF CLIPVisionConfig fields that shape the tower, plus run-time choices."""

    hidden_size: int = 1024  # width D
    intermediate_size: int = 4096  # MLP width
    num_hidden_layers: int = 24  # encoder layers
    num_attention_heads: int = 16  # heads
    num_channels: int = 3  # input channels
    image_size: int = 336  # input resolution (square)
    patch_size: int = 14  # patch side
    hidden_act: str = "quick_gelu"  # MLP activation (OpenAI CLIP: quick_gelu)
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # parameter storage dtype
    attention: Implementation = "auto"  # attention kernel
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN  # the processor's, for uint8 pixels
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD  # the processor's, for uint8 pixels

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _dtypes(cfg: CLIPVisionConfig) -> dict:
    return {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}


class CLIPVisionEmbeddings(nnx.Module):
    """Normalise uint8 pixels, patchify (a stride-p conv as one matmul), prepend CLS, add learned positions."""

    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        dt = _dtypes(cfg)
        self.class_embedding = param(rngs, nnx.initializers.normal(0.02), (d,), dt["param_dtype"], ("norm",))
        # (kh, kw, in, out): HF's conv weight (out, in, kh, kw) transposed.
        self.patch_embedding = PatchConv(p, c, d, rngs=rngs, **dt)
        self.position_embedding = Embed(cfg.num_patches + 1, d, axes=("positions", "embed"), rngs=rngs, **dt)
        self.dtype = dt["dtype"]
        self.image_mean, self.image_std = cfg.image_mean, cfg.image_std

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """Pixels (batch, channels, H, W): uint8 before normalisation, or float already in CLIP space."""
        patches = embed_patches(self.patch_embedding, pixel_values, self.image_mean, self.image_std)
        cls = jnp.broadcast_to(
            self.class_embedding[...].astype(self.dtype), (patches.shape[0], 1, patches.shape[-1])
        )
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding.weight[...].astype(self.dtype)[None]


class PatchConv(nnx.Module):
    """Non-overlapping patch convolution, HF `patch_embedding` (Conv2d; CLIP's has no bias, SigLIP's has one)."""

    def __init__(
        self,
        patch: int,
        channels: int,
        features: int,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        use_bias: bool = False,
    ):
        init = nnx.initializers.normal(0.02)
        self.kernel = param(
            rngs, init, (patch, patch, channels, features), param_dtype, (None, None, None, "embed")
        )
        if use_bias:
            self.bias = param(rngs, nnx.initializers.zeros, (features,), param_dtype, ("embed",))
        self.patch = patch
        self.dtype = dtype

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """(batch, channels, H, W) -> (batch, (H//p)*(W//p), features), patches in row-major order.

        A 'valid' convolution, as HF's: pixels past the last whole patch are dropped (SigLIP's 384
        pixels make 27 patches of 14).
        """
        b, c, h, w = pixel_values.shape
        p = self.patch
        h, w = h // p * p, w // p * p
        x = pixel_values[:, :, :h, :w].astype(self.dtype).reshape(b, c, h // p, p, w // p, p)
        x = x.transpose(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype).reshape(p * p * c, -1))
        return y + self.bias[...].astype(self.dtype) if hasattr(self, "bias") else y


def embed_patches(
    conv: PatchConv, pixel_values: jax.Array, mean: Sequence[float], std: Sequence[float]
) -> jax.Array:
    """Patch features of pixels (batch, channels, H, W): uint8 ones are normalised first, on the
    device; float ones are taken as normalised already."""
    if pixel_values.dtype == jnp.uint8:
        pixel_values = normalize_pixels(pixel_values, mean, std)
    return conv(pixel_values)


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        linear = partial(Linear, d, d, use_bias=True, rngs=rngs, **_dtypes(cfg))
        self.k_proj = linear(axes=("embed", "heads"))
        self.v_proj = linear(axes=("embed", "heads"))
        self.q_proj = linear(axes=("embed", "heads"))
        self.out_proj = linear(axes=("heads", "embed"))
        self.heads = cfg.num_attention_heads
        self.implementation = cfg.attention

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        out = attend(
            split(self.q_proj(x)),
            split(self.k_proj(x)),
            split(self.v_proj(x)),
            lengths=None,
            causal=False,
            implementation=self.implementation,
        )
        return self.out_proj(out.reshape(b, t, d))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
        dt = _dtypes(cfg)
        self.fc1 = Linear(
            cfg.hidden_size, cfg.intermediate_size, use_bias=True, axes=("embed", "mlp"), rngs=rngs, **dt
        )
        self.fc2 = Linear(
            cfg.intermediate_size, cfg.hidden_size, use_bias=True, axes=("mlp", "embed"), rngs=rngs, **dt
        )
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
        norm = partial(LayerNorm, cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs, **_dtypes(cfg))
        self.self_attn = CLIPAttention(cfg, rngs)
        self.layer_norm1 = norm()
        self.mlp = CLIPMLP(cfg, rngs)
        self.layer_norm2 = norm()

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])


def layers_up_to(encoder: CLIPEncoder, layer: int) -> list[CLIPEncoderLayer]:
    """The encoder layers HF's `hidden_states[layer]` has passed (-1 = all of them)."""
    n = len(encoder.layers)
    index = layer + n + 1 if layer < 0 else layer
    if not 0 <= index <= n:
        raise ValueError(f"feature layer {layer} out of range for {n} encoder layers")
    return list(encoder.layers)[:index]


class CLIPVisionTransformer(nnx.Module):
    """HF `vision_model`: embeddings -> pre_layrnorm (sic, HF's name) -> encoder -> post_layernorm."""

    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
        norm = partial(LayerNorm, cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs, **_dtypes(cfg))
        self.embeddings = CLIPVisionEmbeddings(cfg, rngs)
        self.pre_layrnorm = norm()
        self.encoder = CLIPEncoder(cfg, rngs)
        self.post_layernorm = norm()


class CLIPVisionModel(nnx.Module):
    """HF `CLIPVisionModel`. Pixels are (batch, channels, H, W): normalised floats, as HF processors
    emit them, or uint8 before normalisation."""

    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
        self.vision_model = CLIPVisionTransformer(cfg, rngs)
        self.cfg = cfg

    def hidden_state(self, pixel_values: jax.Array, layer: int = -1) -> jax.Array:
        """HF `hidden_states[layer]`: 0 = after pre_layrnorm, i = after encoder layer i, -1 = the last.

        Only the layers up to `layer` run, so layer -2 skips the final encoder layer.
        """
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        for block in layers_up_to(vm.encoder, layer):
            x = block(x)
        return x

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(last_hidden_state, pooler_output) as HF returns them; pooler = post_layernorm(CLS)."""
        last = self.hidden_state(pixel_values, -1)
        return last, self.vision_model.post_layernorm(last[:, 0])

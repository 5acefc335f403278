"""SigLIP ViT vision tower, mirroring HF `SiglipVisionModel` (LLaVA-OneVision's SO400M/14-384).

It differs from CLIP (`unime_jax.models.clip`) only around the encoder, whose layers are CLIP's
(same names, same pre-norm blocks): the patch convolution has a bias, there is no CLS token and no
pre-layernorm, and the positions cover the patches only. LLaVA-OneVision reads
``hidden_states[-1]`` (the last encoder layer, before ``post_layernorm``); the attention-pooling
``head`` of plain SigLIP checkpoints is not implemented (``vision_use_head`` must be false, as in
llava-hf's OneVision configs).

Pixels come as in CLIP: floats already normalised, or uint8 that the tower normalises with the
config's ``image_mean``/``image_std`` (0.5 for SigLIP, as llava-hf's OneVision processors say).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from unime_jax.models.clip import CLIPEncoder, CLIPVisionConfig, PatchConv, embed_patches, layers_up_to
from unime_jax.models.layers import Embed, LayerNorm

SIGLIP_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
SIGLIP_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class SiglipVisionConfig(CLIPVisionConfig):
    """HF SiglipVisionConfig fields that shape the tower (defaults: SO400M/14-384, OneVision's), plus
    run-time choices. The fields are CLIP's, so the encoder layers are CLIP's."""

    hidden_size: int = 1152  # width D
    intermediate_size: int = 4304  # MLP width
    num_hidden_layers: int = 26  # encoder layers
    num_attention_heads: int = 16  # heads
    image_size: int = 384  # input resolution (square)
    patch_size: int = 14  # patch side
    hidden_act: str = "gelu_pytorch_tanh"  # MLP activation
    layer_norm_eps: float = 1e-6  # LayerNorm epsilon
    image_mean: tuple[float, float, float] = SIGLIP_MEAN  # the processor's, for uint8 pixels
    image_std: tuple[float, float, float] = SIGLIP_STD  # the processor's, for uint8 pixels


class SiglipVisionEmbeddings(nnx.Module):
    """Normalise uint8 pixels, patchify (a stride-p conv with bias), add learned positions; no CLS."""

    def __init__(self, cfg: SiglipVisionConfig, rngs: nnx.Rngs):
        dt = {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}
        d = cfg.hidden_size
        self.patch_embedding = PatchConv(cfg.patch_size, cfg.num_channels, d, use_bias=True, rngs=rngs, **dt)
        self.position_embedding = Embed(cfg.num_patches, d, axes=("positions", "embed"), rngs=rngs, **dt)
        self.dtype = dt["dtype"]
        self.image_mean, self.image_std = cfg.image_mean, cfg.image_std

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """Pixels (batch, channels, H, W): uint8 before normalisation, or float already normalised."""
        patches = embed_patches(self.patch_embedding, pixel_values, self.image_mean, self.image_std)
        return patches + self.position_embedding.weight[...].astype(self.dtype)[None]


class SiglipVisionTransformer(nnx.Module):
    """HF `vision_model`: embeddings -> encoder (CLIP's layers) -> post_layernorm."""

    def __init__(self, cfg: SiglipVisionConfig, rngs: nnx.Rngs):
        dt = {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype)}
        self.embeddings = SiglipVisionEmbeddings(cfg, rngs)
        self.encoder = CLIPEncoder(cfg, rngs)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs, **dt)


class SiglipVisionModel(nnx.Module):
    """HF `SiglipVisionModel` without the pooling head. Pixels are (batch, channels, H, W)."""

    def __init__(self, cfg: SiglipVisionConfig, rngs: nnx.Rngs):
        self.vision_model = SiglipVisionTransformer(cfg, rngs)
        self.cfg = cfg

    def hidden_state(self, pixel_values: jax.Array, layer: int = -1) -> jax.Array:
        """HF `hidden_states[layer]`: 0 = the embeddings, i = after encoder layer i, -1 = the last.

        Only the layers up to `layer` run.
        """
        vm = self.vision_model
        x = vm.embeddings(pixel_values)
        for block in layers_up_to(vm.encoder, layer):
            x = block(x)
        return x

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """HF `last_hidden_state`: the last encoder layer through post_layernorm."""
        return self.vision_model.post_layernorm(self.hidden_state(pixel_values, -1))

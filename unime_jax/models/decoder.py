"""One decoder for Llama, Mistral, Phi-3 and Qwen2, mirroring HF's `*ForCausalLM` module tree.

The four families differ only in configuration:
- Phi-3 fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (kept fused, as in HF) and uses
  longrope;
- Mistral may set a sliding window;
- Llama may carry attention/MLP biases;
- Qwen2 has biases on q/k/v only (`qkv_bias`), not on o_proj.

The forward pass returns final-norm hidden states: UniME embeddings are pooled from them and never
need logits. `lm_head` is still built (by default) so checkpoints round-trip losslessly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from unime_jax.models import rope
from unime_jax.models.attention import Implementation, attend
from unime_jax.models.layers import Embed, Linear, RMSNorm, activation
from unime_jax.sharding import constrain

Family = Literal["llama", "mistral", "phi3", "qwen2"]
Remat = Literal["none", "full", "dots_saveable"]


@dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a Llama/Mistral/Phi-3/Qwen2 decoder (what HF's config.json says) plus run-time choices."""

    family: Family  # which HF model family the weights come from
    vocab_size: int  # rows of embed_tokens / lm_head
    hidden_size: int  # model width D
    intermediate_size: int  # MLP width
    num_hidden_layers: int  # decoder layers
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # K/V heads (GQA when fewer than query heads)
    head_dim: int  # per-head width
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: rope.RopeScaling | None = None  # Phi-3 longrope; None = default RoPE
    partial_rotary_factor: float = 1.0  # fraction of head_dim that is rotated
    max_position_embeddings: int = 4096  # longest supported context (enters the longrope factor)
    sliding_window: int | None = None  # Mistral/Phi-3 local attention window
    attention_bias: bool = False  # biases on q/k/v/o projections (Llama option)
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2); o_proj follows attention_bias
    mlp_bias: bool = False  # biases on MLP projections (Llama option)
    hidden_act: str = "silu"  # MLP activation
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens
    lm_head: bool = True  # build lm_head (embeddings never use it; conversion keeps it for round trips)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # parameter storage dtype
    attention: Implementation = "auto"  # attention kernel: auto, xla or cudnn
    remat: Remat = "none"  # per-layer rematerialisation policy

    @property
    def fused(self) -> bool:
        """Phi-3 keeps HF's fused qkv_proj and gate_up_proj."""
        return self.family == "phi3"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


def _linear_factory(cfg: DecoderConfig, rngs: nnx.Rngs):
    return partial(Linear, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


class Attention(nnx.Module):
    """Causal self-attention with RoPE and GQA; HF names q/k/v/o_proj, or qkv_proj for Phi-3."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        linear = _linear_factory(cfg, rngs)
        bias = cfg.attention_bias or cfg.qkv_bias
        if cfg.fused:
            # Fused kernels must not be column-sharded: q, k and v would land on different devices.
            self.qkv_proj = linear(d, (h + 2 * kv) * hd, use_bias=bias, axes=("embed", "qkv_fused"))
        else:
            self.q_proj = linear(d, h * hd, use_bias=bias, axes=("embed", "heads"))
            self.k_proj = linear(d, kv * hd, use_bias=bias, axes=("embed", "kv_heads"))
            self.v_proj = linear(d, kv * hd, use_bias=bias, axes=("embed", "kv_heads"))
        self.o_proj = linear(h * hd, d, use_bias=cfg.attention_bias, axes=("heads", "embed"))
        self.cfg = cfg

    def _project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
        q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        if cfg.fused:
            qkv = self.qkv_proj(x)
            return qkv[..., :q_dim], qkv[..., q_dim : q_dim + kv_dim], qkv[..., q_dim + kv_dim :]
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, lengths: jax.Array | None) -> jax.Array:
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self._project(x)
        q = rope.apply_rope(q.reshape(b, t, cfg.num_attention_heads, cfg.head_dim), cos, sin)
        k = rope.apply_rope(k.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim), cos, sin)
        v = v.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        out = attend(
            q,
            k,
            v,
            lengths=lengths,
            causal=True,
            sliding_window=cfg.sliding_window,
            implementation=cfg.attention,
        )
        return self.o_proj(out.reshape(b, t, -1))


class MLP(nnx.Module):
    """SwiGLU MLP: down(act(gate(x)) * up(x)); Phi-3 computes gate and up with one fused kernel."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        d, i = cfg.hidden_size, cfg.intermediate_size
        linear = _linear_factory(cfg, rngs)
        if cfg.fused:
            self.gate_up_proj = linear(d, 2 * i, use_bias=cfg.mlp_bias, axes=("embed", "mlp_fused"))
        else:
            self.gate_proj = linear(d, i, use_bias=cfg.mlp_bias, axes=("embed", "mlp"))
            self.up_proj = linear(d, i, use_bias=cfg.mlp_bias, axes=("embed", "mlp"))
        self.down_proj = linear(i, d, use_bias=cfg.mlp_bias, axes=("mlp", "embed"))
        self.act = activation(cfg.hidden_act)
        self.fused = cfg.fused

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.fused:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        norm = partial(
            RMSNorm,
            cfg.hidden_size,
            eps=cfg.rms_norm_eps,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            rngs=rngs,
        )
        self.self_attn = Attention(cfg, rngs)
        self.mlp = MLP(cfg, rngs)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, lengths: jax.Array | None) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, lengths)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "seq", "act_embed"))


def _call_layer(layer: DecoderLayer, x: jax.Array, cos: jax.Array, sin: jax.Array, lengths: jax.Array | None):
    return layer(x, cos, sin, lengths)


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderModel(nnx.Module):
    """HF `model`: embed_tokens -> layers -> norm."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed_tokens = Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            axes=("vocab", "embed"),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.cfg = cfg

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        attention_mask: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
    ) -> jax.Array:
        """Final-norm hidden states (batch, seq, hidden). Rows are right-padded; `attention_mask` marks real tokens."""
        cfg = self.cfg
        x = (
            self.embed_tokens(input_ids)
            if inputs_embeds is None
            else inputs_embeds.astype(jnp.dtype(cfg.dtype))
        )
        x = constrain(x, ("batch", "seq", "act_embed"))
        lengths = None if attention_mask is None else jnp.sum(attention_mask, axis=-1, dtype=jnp.int32)
        cos, sin = rope.cos_sin(
            x.shape[1],
            rotary_dim=cfg.rotary_dim,
            theta=cfg.rope_theta,
            scaling=cfg.rope_scaling,
            max_position_embeddings=cfg.max_position_embeddings,
            dtype=x.dtype,
        )
        run = _call_layer
        if cfg.remat != "none":
            run = nnx.remat(_call_layer, policy=_REMAT_POLICIES[cfg.remat])
        for layer in self.layers:
            x = run(layer, x, cos, sin, lengths)
        return self.norm(x)


def build_lm_head(owner: nnx.Module, cfg: DecoderConfig, rngs: nnx.Rngs) -> None:
    """Give a `*ForCausalLM` module its untied `lm_head` (unless the config ties or omits it)."""
    if cfg.lm_head and not cfg.tie_word_embeddings:
        owner.lm_head = _linear_factory(cfg, rngs)(
            cfg.hidden_size, cfg.vocab_size, use_bias=False, axes=("embed", "vocab")
        )


class DecoderLM(nnx.Module):
    """HF `*ForCausalLM`: `model` plus an optional `lm_head`."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        self.model = DecoderModel(cfg, rngs)
        build_lm_head(self, cfg, rngs)
        self.cfg = cfg

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        attention_mask: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
    ) -> jax.Array:
        return self.model(input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.cfg.tie_word_embeddings:
            return jnp.dot(hidden, self.model.embed_tokens.weight[...].astype(hidden.dtype).T)
        if not hasattr(self, "lm_head"):
            raise ValueError("this model was built without lm_head (DecoderConfig.lm_head=False)")
        return self.lm_head(hidden)

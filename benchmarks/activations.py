"""Activation memory by remat policy, from the residuals JAX saves for the backward pass (CPU).

The training step's memory beyond the weights is what the forward pass keeps for the backward:
its residuals. `jax.ad_checkpoint`'s residual accounting lists them for the real decoder (our
`DecoderLM` with the stage's LoRA adapters and dropout, bf16, at full width), traced with
abstract parameters, so nothing is allocated and it runs anywhere in seconds. A one-layer and a
two-layer model give the bytes per token per layer; the layer count and a chunk's tokens give
the estimate for a step:

    activations ≈ layers × tokens held × bytes per token per layer

where "tokens held" is one GradCache chunk's tokens per device (the pull-back runs one chunk at
a time), or every token the step differentiates at once without GradCache (for the packed
layout, every length class's full capacity: a scan keeps the residuals of its skipped chunks
too).

What this does not see, and why it is an upper bound for the policies that save most: XLA may
fuse a cheap elementwise residual into its backward consumer instead of keeping it. Attention's
(L, L) terms are left out: they are the CPU (XLA) attention's; cuDNN's fused attention keeps
O(L) statistics instead. How loose the bound is: W1 (BENCHMARKS.md: Phi-3.5-mini, 256 × 64
tokens, remat none) ran on one 141 GB H200, where this accounting says 139 GiB of activations
plus 7.7 GiB of weights. Measure on the card before relying on a tight fit.

    PYTHONPATH=. python benchmarks/activations.py [--tokens N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals  # the accounting behind print_saved_residuals

from unime_jax.backbones.decoder_hf import lm_targets
from unime_jax.data.packing import pack_classes, packed_lengths
from unime_jax.models import lora, pooling
from unime_jax.models.decoder import DecoderConfig, DecoderLM

POLICIES = ("none", "dots_saveable", "full")
GIB = 2**30


@dataclass(frozen=True)
class LM:
    name: str
    cfg: DecoderConfig
    weights_gib: float  # the whole backbone in bf16 (LM + CLIP + projector), replicated per device


# The two backbones' language models at full width (their HF config.json values).
LMS = (
    LM("LLaVA-1.6 (Mistral-7B)", DecoderConfig("mistral", 32064, 4096, 14336, 32, 32, 8, 128), 14.1),
    LM("Phi-3.5-V (Phi-3.5-mini)", DecoderConfig("phi3", 32064, 3072, 8192, 32, 32, 32, 96), 7.7),
)


def residual_bytes(cfg: DecoderConfig, remat: str, rank: int, length: int) -> float:
    """Bytes the backward keeps per token (summed over layers) for a LoRA model of ``cfg``'s layers."""
    cfg = replace(cfg, dtype="bfloat16", param_dtype="bfloat16", attention="xla", remat=remat, lm_head=False)
    adapters = lora.LoRAConfig(rank, 2.0 * rank, 0.1, lm_targets(cfg.family, prefix=""))

    def build() -> DecoderLM:
        model = DecoderLM(cfg, nnx.Rngs(0))
        lora.apply_lora(model, adapters, nnx.Rngs(0))
        return model

    graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.LoRAParam, ...)

    def embed_sum(params: nnx.State, rest: nnx.State, ids: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params, lora.lora_dropout_keys(rest, 0), copy=True)
        mask = jnp.ones(ids.shape, jnp.int32)
        return pooling.embed(model(ids, attention_mask=mask), mask).sum()

    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    total = 0.0
    for aval, source in saved_residuals(embed_sum, params, rest, ids):
        if source.startswith("from "):  # parameters, inputs, constants: not activations
            continue
        if aval.shape.count(length) == 1:  # per-token; (L, L) attention terms are the CPU kernel's
            total += math.prod(aval.shape) * aval.dtype.itemsize / length
    return total


def per_layer(cfg: DecoderConfig, remat: str, rank: int, length: int = 256) -> float:
    """Bytes per token per decoder layer: two layers minus one (the embedding and final norm cancel)."""
    one, two = (residual_bytes(replace(cfg, num_hidden_layers=n), remat, rank, length) for n in (1, 2))
    return two - one


def packed_capacity(rows: int, max_len: int, chunk_tokens: int, max_chunk_rows: int) -> int:
    """Tokens every text class of the packed layout can hold for ``rows`` rows per device."""
    classes = pack_classes(packed_lengths(max_len), (), chunk_tokens, max_chunk_rows)
    return sum(math.ceil(rows / c.rows) * c.rows * c.length for c in classes)


# Tokens held per device at once by the production configs on 8 devices.
STAGE1_ROWS = 768 // 8 * 3  # anchors, positives, hard negatives
WORKLOADS = {
    "stage 2, one GradCache chunk": 6144,  # layout.chunk_tokens (configs/stage2_common.yaml)
    "stage 1, padded": STAGE1_ROWS * 64,
    "stage 1, packed, no GradCache": packed_capacity(STAGE1_ROWS, 64, 4096, 64),  # stage1_common.yaml
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokens", type=int, help="one more workload: this many tokens held per device at once"
    )
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (the residuals barely depend on it)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    workloads = WORKLOADS | ({f"{args.tokens} tokens": args.tokens} if args.tokens else {})
    results: dict = {"jax": jax.__version__, "workloads": workloads, "models": {}}
    for name, tokens in workloads.items():
        print(f"{name}: {tokens} tokens per device")
    for lm in LMS:
        layers = lm.cfg.num_hidden_layers
        rows = {}
        for remat in POLICIES:
            kib = per_layer(lm.cfg, remat, args.rank) / 1024
            totals = {name: layers * t * kib * 1024 / GIB for name, t in workloads.items()}
            rows[remat] = {"kib_per_token_per_layer": kib, "activations_gib": totals}
            estimates = "; ".join(f"{name} {g:.1f} GiB" for name, g in totals.items())
            print(f"{lm.name:26s} remat {remat:13s} {kib:6.1f} KiB/token/layer; {estimates}", flush=True)
        results["models"][lm.name] = {"weights_gib": lm.weights_gib, "layers": layers, "policies": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()

"""NF4 storage of frozen kernels through qwix: the 4-bit base of QLoRA.

QLoRA (Dettmers et al., 2023) keeps each frozen weight as 4-bit NormalFloat codes, 16 levels
placed at the quantiles of a normal distribution, with one absmax scale per block of 64 weights,
and trains bf16 adapters over the dequantized weight. qwix (the JAX team's quantisation library)
provides the NF4 code book and the (de)quantisation; here a Linear's (in, out) kernel is cut into
blocks along its input axis, one scale per block and output column, and is dequantized to the
scales' dtype (the kernel's stored one) wherever the layer runs. A block is 64 inputs when 64
divides the input width, else the largest power of two that does (:func:`block_size`: gcd(in,
64)): 16 for SigLIP-SO400M's fc2 (4304 inputs), 32 for a 96-wide toy model.

Codes are ``uint4`` arrays (half a byte per weight on accelerators); the scales add one value
per block (per 64 weights at full blocks). Both are :class:`NF4Param`, frozen like any base parameter.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

__all__ = ["BLOCK", "NF4Param", "dequantize", "quantize"]

BLOCK = 64  # QLoRA's block size


class NF4Param(nnx.Param):
    """NF4 codes or block scales of a frozen kernel (QLoRA's base); never trained."""


def block_size(fan_in: int) -> int:
    """Inputs per block: 64, or gcd(fan_in, 64) when 64 does not divide ``fan_in`` (e.g. 16 for 4304)."""
    return math.gcd(fan_in, BLOCK)


def _qwix():
    try:
        import qwix
    except ImportError as e:
        raise ImportError(
            "lora.quantize_base: nf4 needs the qwix package: pip install 'unime-jax[qlora]'"
        ) from e
    return qwix


def quantize(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(codes uint4 (in, out), scales (in / block, out) in the kernel's dtype) of an (in, out) kernel."""
    qwix = _qwix()
    block = block_size(kernel.shape[0])
    q = qwix.quantize(kernel, "nf4", channelwise_axes=[1], tiled_axes={0: block})
    return q.qvalue, q.scale


def dequantize(codes: jax.Array, scales: jax.Array) -> jax.Array:
    """The (in, out) kernel that :func:`quantize` stored, in the scales' dtype."""
    qwix = _qwix()
    return qwix.dequantize(qwix.QArray(codes, scales, None, "nf4"))

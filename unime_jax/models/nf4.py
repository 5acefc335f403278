"""NF4 storage of frozen kernels through qwix: the 4-bit base of QLoRA.

QLoRA (Dettmers et al., 2023) keeps each frozen weight as 4-bit NormalFloat codes, 16 levels
placed at the quantiles of a normal distribution, with one absmax scale per block of 64 weights,
and trains bf16 adapters over the dequantized weight. qwix (the JAX team's quantisation library)
provides the NF4 code book and the (de)quantisation; here a Linear's (in, out) kernel is cut into
blocks of 64 along its input axis, one scale per block and output column, and is dequantized
to the scales' dtype (the kernel's stored one) wherever the layer runs.

Codes are ``uint4`` arrays (half a byte per weight on accelerators); the scales add one value
per 64 weights. Both are :class:`NF4Param`, frozen like any base parameter.
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
    """64, or the largest divisor of ``fan_in`` that divides 64 (tiny models)."""
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

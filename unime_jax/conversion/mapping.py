"""Our parameter paths <-> HF tensor names, and the layout transforms between them.

The models mirror HF's module tree, so the mapping is generic:
- `a.b.kernel` is HF `a.b.weight`, transposed ((in, out) vs (out, in); 4-D conv kernels are
  (kh, kw, in, out) vs (out, in, kh, kw));
- every other name is identical;
- per-model prefix renames (`ModelSpec.key_layouts`) cover checkpoints whose top-level names
  differ between transformers versions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Layout = tuple[tuple[str, str], ...]

# Non-parameter buffers that some checkpoints carry; they are recomputed, not loaded.
_BUFFERS = (re.compile(r"(^|\.)rotary_emb\.inv_freq$"), re.compile(r"(^|\.)embeddings\.position_ids$"))
# With tied embeddings, a stored lm_head is a copy of embed_tokens.
_TIED_HEAD = re.compile(r"(^|\.)lm_head\.weight$")
_SHOWN = 20


class ConversionError(ValueError):
    """The HF tensors and the model's parameters do not correspond one to one."""


def hf_key(ours: str, layout: Layout) -> str:
    for our_prefix, hf_prefix in layout:
        if ours.startswith(our_prefix):
            ours = hf_prefix + ours[len(our_prefix) :]
            break
    if ours.endswith(".kernel"):
        return ours[: -len("kernel")] + "weight"
    return ours


def _kernel_axes(ours: str, ndim: int) -> tuple[int, ...] | None:
    """Axis permutation taking our layout to HF's (None: identical layouts)."""
    if not ours.endswith(".kernel"):
        return None
    perms = {2: (1, 0), 4: (3, 2, 0, 1)}
    if ndim not in perms:
        raise ConversionError(f"{ours}: no HF layout rule for a {ndim}-D kernel")
    return perms[ndim]


def to_hf_array(ours: str, array: np.ndarray) -> np.ndarray:
    perm = _kernel_axes(ours, array.ndim)
    return array if perm is None else np.transpose(array, perm)


def from_hf_array(ours: str, array: np.ndarray) -> np.ndarray:
    perm = _kernel_axes(ours, array.ndim)
    return array if perm is None else np.transpose(array, np.argsort(perm))


def hf_shape(ours: str, shape: Sequence[int]) -> tuple[int, ...]:
    perm = _kernel_axes(ours, len(shape))
    return tuple(shape) if perm is None else tuple(shape[p] for p in perm)


@dataclass
class Plan:
    """Which HF tensor fills which parameter, and which HF tensors are deliberately skipped."""

    layout: Layout
    pairs: list[tuple[str, str]]  # (our path, HF key), in our parameter order
    ignored: list[str]


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    more = f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"\n  {title} ({len(items)}): {shown}{more}"


def plan(
    ours: dict[str, tuple[int, ...]],
    hf: dict[str, tuple[int, ...]],
    layouts: Sequence[Layout],
    *,
    tied_embeddings: bool,
    source: str,
    aliases: Sequence[str] = (),
) -> Plan:
    """Match every parameter to exactly one HF tensor, or raise listing every mismatch.

    `aliases` are regexes of HF keys that duplicate another stored tensor (skipped, reported).
    """
    layout = max(layouts, key=lambda lay: sum(hf_key(name, lay) in hf for name in ours))
    wanted = {hf_key(name, layout): name for name in ours}
    skip = [*_BUFFERS, *([_TIED_HEAD] if tied_embeddings else []), *(re.compile(a) for a in aliases)]
    ignored = sorted(k for k in hf if k not in wanted and any(p.search(k) for p in skip))
    missing = sorted(k for k in wanted if k not in hf)
    unexpected = sorted(k for k in hf if k not in wanted and k not in ignored)
    bad_shapes = sorted(
        f"{key}: file {hf[key]} vs model {hf_shape(name, ours[name])}"
        for key, name in wanted.items()
        if key in hf and tuple(hf[key]) != hf_shape(name, ours[name])
    )
    if missing or unexpected or bad_shapes:
        message = f"cannot convert {source}: its tensors do not match the model built from its config.json"
        if missing:
            message += _listing("missing HF tensors", missing)
        if unexpected:
            message += _listing("unexpected HF tensors", unexpected)
        if bad_shapes:
            message += _listing("wrong shapes", bad_shapes)
        message += "\nCheck that config.json belongs to these weights and that the files are complete."
        raise ConversionError(message)
    return Plan(layout, [(name, hf_key(name, layout)) for name in ours], ignored)

"""benchmarks/activations.py: the residual accounting behind the README's remat-per-card advice."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from unime_jax.models.decoder import DecoderConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
activations = pytest.importorskip("activations")

TINY = DecoderConfig("mistral", 512, 64, 128, 2, 4, 2, 16)


def test_full_remat_keeps_only_each_layer_input_and_the_policies_order():
    kept = {remat: activations.per_layer(TINY, remat, rank=4, length=32) for remat in activations.POLICIES}
    # nothing_saveable keeps a layer's bf16 input, hidden_size x 2 bytes per token, and nothing else.
    assert kept["full"] == TINY.hidden_size * 2
    assert kept["full"] < kept["dots_saveable"] < kept["none"]


def test_packed_capacity_holds_every_class_for_every_row():
    # lengths 8..64 in steps of 8; 4096 // 8 rows caps at 64: each class holds ceil(288/64)*64 = 320 rows.
    assert activations.packed_capacity(288, 64, 4096, 64) == 320 * sum(range(8, 65, 8))

"""benchmarks/flops.py: executed vs useful FLOPs, the accounting behind BENCHMARKS.md's padding figures."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from unime_jax.backbones import spec_for
from unime_jax.data.packing import PackSpec, pack_classes
from unime_jax.models import lora

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
flops = pytest.importorskip("flops")


@pytest.fixture(scope="module")
def costs():
    spec = spec_for("llava_next")
    arch = spec.from_hf(flops.tiny_llava16())
    adapters = lora.LoRAConfig(4, 8.0, 0.1, spec.lora_targets(arch))
    return flops.Costs(arch, adapters, "none", {})


def _text_batch(lengths: list[int], padded: int) -> dict[str, np.ndarray]:
    mask = (np.arange(padded) < np.array(lengths)[:, None]).astype(np.int32)
    return {"anchor_input_ids": mask * 5, "anchor_attention_mask": mask}


def test_the_fitted_row_cost_is_the_lowered_one(costs):
    for length in (20, 100):
        assert costs.fit_error("text", "vjp", length) < 1e-6
    # A chunk of r rows costs r rows, but for per-call work such as the RoPE tables (0.2% of this
    # tiny model; 5e-5 at 7B, which the script checks).
    assert costs.lowered("text", "fwd", 4, 40) == pytest.approx(4 * costs.lowered("text", "fwd", 1, 40), rel=1e-2)
    # The backward is dearer than the forward, and remat full recomputes the forward in it.
    fwd, vjp = costs.row("text", "fwd", 64), costs.row("text", "vjp", 64)
    assert fwd < vjp < costs.row("text", "vjp", 64, remat="full") <= vjp + fwd * 1.01


def test_rows_at_their_padded_length_waste_nothing_and_padding_is_counted(costs):
    full = flops.step_count(costs, _text_batch([64] * 8, 64), None, gradcache=False)
    assert full.ratio == pytest.approx(1.0, abs=1e-6)
    half = flops.step_count(costs, _text_batch([64] * 4 + [16] * 4, 64), None, gradcache=True)
    per_row = {n: costs.row("text", "fwd", n) + costs.row("text", "vjp", n) for n in (16, 64)}
    assert half.executed == pytest.approx(8 * per_row[64], rel=1e-6)
    assert half.useful == pytest.approx(4 * per_row[64] + 4 * per_row[16], rel=1e-6)


def test_packed_chunks_run_as_often_as_the_fullest_shard(costs):
    spec = PackSpec(pack_classes((16, 64), (), chunk_tokens=256, max_rows=2), shards=2)
    # Rows at exactly their class lengths filling whole chunks: no waste.
    exact = flops.step_count(costs, _text_batch([64, 64, 16, 16] * 2, 64), spec, gradcache=False)
    assert exact.ratio == pytest.approx(1.0, abs=1e-6)
    # Shard 0 gets two 64-token rows, shard 1 three: both run two text64 chunks (lockstep), and the
    # three 16-token rows ride in their empty slots instead of running text16 chunks.
    odd = flops.step_count(costs, _text_batch([16, 16, 16, 64, 64, 64, 64, 64], 64), spec, gradcache=False)
    c16, c64 = costs.row("text", "vjp", 16), costs.row("text", "vjp", 64)
    assert odd.executed == pytest.approx(2 * 2 * 2 * c64, rel=1e-6)
    assert odd.useful == pytest.approx(3 * c16 + 5 * c64, rel=1e-6)

"""`UniME.encode`'s batching leaves embeddings unchanged: length buckets, tile-count grouping and
cut tile slots, the thread pool and streaming, against each row run alone at the fixed full shape
(every tile slot, seq_len tokens) on tiny random LLaVA-NeXT and Phi-3-V models."""

from __future__ import annotations

import io
import os

import jax
import numpy as np
import pytest
from flax import nnx
from helpers.llava import random_image
from helpers.tiny_configs import llava_config, phi3_v_config
from helpers.tokenizers import llava_tokenizer, phi_tokenizer

from unime_jax import UniME
from unime_jax.backbones import spec_for
from unime_jax.embedder import BadInput, enable_compilation_cache
from unime_jax.models.pooling import embed
from unime_jax.processing.prompts import bucket_length, length_buckets
from unime_jax.sharding import make_mesh

# (height, width) -> real tiles: LLaVA-NeXT 5 3 4 5 3 4 3 4 (the base tile + its grid); Phi-3-V
# 5 5 5 5 3 4 3 4 (the global view + its crops). Token counts do not sort them by tile count.
SIZES = [(30, 40), (28, 28), (90, 20), (61, 57), (20, 50), (30, 90), (28, 56), (100, 30)]
TEXTS = ["A dog.", "Two people sit on a bench in a park while pigeons gather around.", "Rain."]


@pytest.fixture(autouse=True, scope="module")
def _no_compilation_cache():
    with pytest.MonkeyPatch.context() as patch:  # tests never write to the user's cache
        patch.setenv("UNIME_JAX_COMPILATION_CACHE", "0")
        yield


def test_buckets_are_fine_above_512_tokens():
    buckets = length_buckets(7024)
    assert buckets[:9] == (32, 48, 64, 96, 128, 192, 256, 384, 512)
    assert buckets[9:14] == (640, 768, 896, 1024, 1280) and buckets[-1] == 7024
    steps = np.diff(buckets)
    assert set(steps[13:-1]) == {256}  # every 256 tokens beyond 1024
    # The examples: 1225 and 2389 tokens padded to 1536 and 3072 before.
    assert (bucket_length(1225, buckets), bucket_length(2389, buckets)) == (1280, 2560)
    # Padding is at most 25% above 512 tokens and at most 12.5% above 2048.
    for length in range(513, 7024):
        padded = bucket_length(length, buckets)
        assert padded - length < (0.25 if length <= 2048 else 0.125) * length


def _tiny(model_type: str) -> tuple[UniME, nnx.Module]:
    cfg = llava_config() if model_type == "llava_next" else phi3_v_config()
    tokenizer = llava_tokenizer() if model_type == "llava_next" else phi_tokenizer()
    model = spec_for(model_type).module_cls(cfg, nnx.Rngs(3))
    mesh = make_mesh(devices=jax.devices()[:2])  # batches are split, without 8 copies on 2 cores
    return UniME(model, model_type, cfg, tokenizer, mesh=mesh, max_len=64), model


@pytest.fixture(scope="module", params=["llava_next", "phi3_v"])
def tiny(request) -> tuple[UniME, nnx.Module]:
    return _tiny(request.param)


def _alone_at_full_shape(unime: UniME, model: nnx.Module, text: str | None, image) -> np.ndarray:
    """One row through the featurizer's fixed shapes (seq_len tokens, every tile slot)."""
    arrays = unime.featurizer()(text or "", image)
    keys = ["input_ids", "attention_mask"] + (
        [] if image is None else list(unime.featurizer().inputs.empty())
    )
    batch = {key: jax.numpy.asarray(arrays[key][None]) for key in keys}
    return np.asarray(embed(model(**batch), batch["attention_mask"]))[0]


def test_batched_encode_equals_each_row_alone(tiny, tmp_path):
    unime, model = tiny
    images = [random_image(size, seed) for seed, size in enumerate(SIZES)]
    images[1].save(tmp_path / "1.png")  # a path and encoded bytes too: each is decoded once
    buffer = io.BytesIO()
    images[2].save(buffer, format="PNG")
    sources = [images[0], tmp_path / "1.png", buffer.getvalue(), *images[3:]]
    rows = [(text, None) for text in TEXTS] + [(None, source) for source in sources]
    expected = np.stack([_alone_at_full_shape(unime, model, None, image) for image in images])
    texts_expected = np.stack([_alone_at_full_shape(unime, model, text, None) for text in TEXTS])

    shapes = []
    forward = unime._forward

    def recording(state, batch):  # the real forward pass; only the tile slots it gets are noted
        shapes.append(batch["pixel_values"].shape[:2] if "pixel_values" in batch else None)
        return forward(state, batch)

    unime._forward = recording
    try:
        got = unime.encode([t for t, _ in rows], [i for _, i in rows], batch_size=4, workers=2)
    finally:
        unime._forward = forward
    np.testing.assert_allclose(got[:3], texts_expected, atol=1e-5)
    np.testing.assert_allclose(got[3:], expected, atol=1e-5)

    featurizer = unime.featurizer()
    tiles = sorted(featurizer.inputs.num_tiles(featurizer.process_image(image)[0]) for image in images)
    image_batches = [s for s in shapes if s is not None]
    # Rows are grouped by tile count: each batch has as many slots as its largest real tile count,
    # and fewer slots run through CLIP than with every row at the worst case.
    assert [p for _, p in image_batches] == [max(tiles[:4]), max(tiles[4:])]
    worst = featurizer.inputs.empty()["pixel_values"].shape[0]
    assert sum(b * p for b, p in image_batches) < sum(b for b, _ in image_batches) * worst


def test_a_stream_of_chunks_equals_one_call_and_records_bad_rows(tiny, tmp_path):
    unime, _ = tiny
    images = [random_image(size, seed + 20) for seed, size in enumerate(SIZES[4:7])]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    rows = [(TEXTS[0], None), (None, images[0]), BadInput("unreadable record"), (None, images[1])]
    rows += [(None, tmp_path / "corrupt.png"), (TEXTS[2], None), (None, images[2]), ("", None)]
    good = [0, 1, 3, 5, 6]
    whole = unime.encode([rows[i][0] for i in good], [rows[i][1] for i in good], batch_size=2)
    seen = []
    chunks = list(unime.encode_stream([rows[:3], rows[3:]], batch_size=2, skip_bad=True, on_rows=seen.append))
    got = np.concatenate([c.embeddings for c in chunks])
    np.testing.assert_allclose(got[good], whole, atol=1e-5)
    assert np.isnan(got[[2, 4, 7]]).all() and sum(seen) == len(rows)
    assert chunks[0].errors == {2: "unreadable record"}
    assert (
        set(chunks[1].errors) == {1, 4}
        and "cannot read image" in chunks[1].errors[1]
        and "corrupt.png" in chunks[1].errors[1]
    )
    assert "needs a text or an image" in chunks[1].errors[4]
    with pytest.raises(ValueError, match="input 2: unreadable record"):
        list(unime.encode_stream([rows[:3]], batch_size=2))


def test_collate_keeps_only_the_batch_s_real_tile_slots():
    unime, _ = _tiny("llava_next")
    featurizer = unime.featurizer()
    small = featurizer.process_image(random_image((28, 28), 1))  # base + 1×2 grid: 3 tiles
    large = featurizer.process_image(random_image((56, 56), 2))  # base + 2×2 grid: 5 tiles
    ids = [featurizer.token_ids(None, small[1])[0], featurizer.token_ids(TEXTS[0])[0]]
    batch = featurizer.collate(ids, [small[0], None])
    assert batch["pixel_values"].shape[:2] == (2, 3)
    np.testing.assert_array_equal(batch["pixel_values"][0], small[0]["pixel_values"][:3])
    assert not batch["pixel_values"][1].any() and not batch["image_grids"][1].any()
    both = featurizer.collate(ids[:1] * 2, [small[0], large[0]])
    assert both["pixel_values"].shape[1] == 5 and not both["pixel_values"][0, 3:].any()


def test_the_compilation_cache_can_be_turned_off():
    """On by default (tests/test_encode_cli.py checks the CLI's); this module's fixture sets =0."""
    assert os.environ["UNIME_JAX_COMPILATION_CACHE"] == "0"
    assert enable_compilation_cache() is None and jax.config.jax_compilation_cache_dir is None

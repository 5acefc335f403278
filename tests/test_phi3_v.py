"""Phi-3.5-V: parity with the VLM2Vec PyTorch reference (fp32, <= 1e-4), static shapes, conversion.

The reference hard-codes a CLIP-L/14-336 tower and asserts its geometry (336 px crops, 24×24
patches, 1024 channels), so the parity model keeps that geometry with a shallow, narrow tower; the
jit test uses our configurable tower at a toy geometry instead.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers.phi3_v_reference import (  # noqa: F401
    BOS,
    CLIP_OVERRIDES,
    PAD,
    VOCAB,
    RefModel,
    reference_clip,
    reference_config,
    write_reference,
)
from helpers.tensors import assert_bit_identical, tensors
from safetensors.numpy import load_file, save_file
from vlm2vec_for_pyserini.model.baseline_backbone.phi3_v.configuration_phi3_v import (
    Phi3VConfig as RefConfig,
)

from convert.__main__ import main
from unime_jax.backbones import SPECS, with_runtime
from unime_jax.conversion import load_hf_model
from unime_jax.model_io import abstract_model
from unime_jax.models.clip import CLIPVisionConfig
from unime_jax.models.decoder import DecoderConfig
from unime_jax.models.phi3_v import Phi3VConfig, merge_2x2
from unime_jax.sharding import make_mesh

TOL = 1e-4
NUM_CROPS, CROP = 4, 336
Grid = tuple[int, int] | None  # (h_crops, w_crops); None = text-only row


def processor_token_count(h: int, w: int) -> int:
    """Phi3VImageProcessor.calc_num_image_tokens for an (h·336)×(w·336) HD image."""
    return (h * w + 1) * 144 + 1 + (h + 1) * 12






@pytest.fixture(scope="module")
def reference(tmp_path_factory, reference_clip):  # noqa: F811
    """(HF directory, reference model); the directory holds what save_pretrained writes."""
    out = tmp_path_factory.mktemp("phi3_v") / "hf"
    return out, write_reference(out)


@pytest.fixture(scope="module")
def ours(reference):
    # One device: the default mesh would replicate the model over conftest's 8 fake CPU devices and
    # run every op 8 times on the same cores.
    return load_hf_model(reference[0], make_mesh(devices=jax.devices()[:1]), progress=False)


def _jitted(graphdef: nnx.GraphDef):
    """forward(state, inputs) -> final hidden states; inputs are the model's keyword arguments."""
    return jax.jit(lambda state, inputs: nnx.merge(graphdef, state)(**inputs))


def _hidden(model: nnx.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Our final hidden states, jitted (op-by-op dispatch of the CLIP tower is several times slower)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_jitted(graphdef)(state, {k: jnp.asarray(v) for k, v in inputs.items()}))


def _prompt(rng: np.random.Generator, before: int, grid: Grid, after: int) -> list[int]:
    """Ids as Phi3VProcessor builds them: each text chunk is tokenised on its own (so starts with BOS)
    and the image between them is [-1] * num_img_tokens."""

    def chunk(n: int) -> list[int]:
        return [BOS, *rng.integers(3, VOCAB, n).tolist()]

    if grid is None:
        return chunk(before)
    return [*chunk(before), *[-1] * processor_token_count(*grid), *chunk(after)]


def _batch(rows: list[tuple[list[int], Grid]], seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded model inputs; image rows get random crops (global view first, unused slots zero)."""
    rng = np.random.default_rng(seed)
    length = max(len(ids) for ids, _ in rows)
    batch = {
        "input_ids": np.full((len(rows), length), PAD, np.int64),
        "attention_mask": np.zeros((len(rows), length), np.int64),
        "pixel_values": np.zeros((len(rows), NUM_CROPS + 1, 3, CROP, CROP), np.float32),
        "image_sizes": np.zeros((len(rows), 2), np.int64),
    }
    for i, (ids, grid) in enumerate(rows):
        batch["input_ids"][i, : len(ids)] = ids
        batch["attention_mask"][i, : len(ids)] = 1
        if grid is not None:
            h, w = grid
            batch["pixel_values"][i, : 1 + h * w] = rng.standard_normal((1 + h * w, 3, CROP, CROP))
            batch["image_sizes"][i] = (h * CROP, w * CROP)
    return batch


def _reference_hidden(ref: RefModel, batch: dict[str, np.ndarray], grids: list[Grid]) -> np.ndarray:
    """VLM2Vec's forward takes pixel_values and image_sizes as per-row lists, None for text-only rows."""

    def per_row(key: str) -> list[torch.Tensor | None]:
        return [None if grid is None else torch.tensor(batch[key][i : i + 1]) for i, grid in enumerate(grids)]

    with torch.no_grad():
        out = ref(
            input_ids=torch.tensor(batch["input_ids"]),
            attention_mask=torch.tensor(batch["attention_mask"]),
            pixel_values=per_row("pixel_values"),
            image_sizes=per_row("image_sizes"),
            output_hidden_states=True,
            use_cache=False,  # VLM2Vec's cache path calls an API transformers 4.57 removed
        )
    return out.hidden_states[-1].numpy()


def _max_real_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(a - b)[mask.astype(bool)].max())


def _text_config() -> DecoderConfig:
    return DecoderConfig(
        family="phi3",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        lm_head=False,
    )


def test_token_counts_follow_the_processor():
    cfg = Phi3VConfig(text=_text_config(), num_crops=NUM_CROPS)
    for h in range(1, 5):
        for w in range(1, 5):
            assert cfg.num_image_tokens(h, w) == processor_token_count(h, w)
    assert processor_token_count(2, 2) == 757
    assert cfg.max_image_tokens == processor_token_count(4, 1) == 781  # the 4×1 grid is the longest
    assert cfg.max_crops == 5


@pytest.mark.parametrize("grids", [[(1, 1), (2, 2), (1, 2), (2, 1)], [(4, 1), (1, 4), (1, 3), (3, 1)]])
def test_hd_layout_and_projection_match_reference(reference, ours, grids):
    """Every crop grid with h·w <= 4, from CLIP features on: merge, separators, tiling, projector."""
    ref = reference[1]
    rng = np.random.default_rng(0)
    patches = rng.standard_normal((len(grids), NUM_CROPS + 1, 576, 1024)).astype(np.float32)
    sizes = np.asarray([(h * CROP, w * CROP) for h, w in grids])
    with torch.no_grad():
        expected = ref.model.vision_embed_tokens.hd_feature_transform(
            torch.tensor(patches), torch.tensor(sizes)
        ).numpy()
    embedding = ours.model.model.vision_embed_tokens
    tokens = merge_2x2(jnp.asarray(patches.reshape(-1, *patches.shape[2:])), 24)
    table = tokens.reshape(len(grids), -1, tokens.shape[-1])
    index = ours.model.feature_index(ours.model.cfg.max_image_tokens, jnp.asarray(sizes))
    gathered = jnp.take_along_axis(table, index[..., None], axis=1)
    got = np.asarray(embedding.pack_features(gathered, jnp.asarray(sizes)))
    counts = [processor_token_count(h, w) for h, w in grids]
    assert expected.shape[0] == sum(counts)
    mine = np.concatenate([got[i, :n] for i, n in enumerate(counts)])
    assert np.abs(mine - expected).max() <= TOL


def test_text_only_batch_matches_reference(reference, ours):
    rng = np.random.default_rng(1)
    rows = [(_prompt(rng, 11, None, 0), None), (_prompt(rng, 6, None, 0), None)]
    batch = _batch(rows)
    expected = _reference_hidden(reference[1], batch, [None, None])
    got = _hidden(ours.model, {k: batch[k] for k in ("input_ids", "attention_mask")})  # pixel_values None
    assert _max_real_diff(got, expected, batch["attention_mask"]) <= TOL


def test_mixed_image_batch_matches_reference(reference, ours):
    """Image+text, image-only and text-only rows, three crop grids, right-padded together."""
    rng = np.random.default_rng(2)
    grids: list[Grid] = [(2, 2), (1, 2), None, (2, 1)]
    rows = [
        (_prompt(rng, 5, (2, 2), 7), (2, 2)),
        (_prompt(rng, 0, (1, 2), 0), (1, 2)),  # "<|image_1|>" alone: BOS, image, BOS
        (_prompt(rng, 9, None, 0), None),
        (_prompt(rng, 3, (2, 1), 4), (2, 1)),
    ]
    batch = _batch(rows, seed=3)
    expected = _reference_hidden(reference[1], batch, grids)
    got = _hidden(ours.model, batch)
    for i in range(len(rows)):
        mask = batch["attention_mask"][i : i + 1]
        assert _max_real_diff(got[i : i + 1], expected[i : i + 1], mask) <= TOL, f"row {i} ({grids[i]})"


def test_one_compilation_for_batches_with_different_crop_grids():
    """A toy geometry (28 px crops of 4×4 patches: 2×2 tokens per crop) keeps this fast."""
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
    )
    cfg = Phi3VConfig(text=_text_config(), vision=vision, num_crops=NUM_CROPS)
    # Parameters from numpy: compiling JAX's random initialisers takes longer than this whole test.
    graphdef, abstract = nnx.split(abstract_model(SPECS["phi3_v"], cfg))
    rng = np.random.default_rng(4)
    state = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), abstract)
    forward = _jitted(graphdef)
    length, side = cfg.max_image_tokens + 6, cfg.crop_size
    for grids in ([(2, 2), None], [(4, 1), (1, 3)]):
        ids = np.full((2, length), PAD, np.int32)
        for i, grid in enumerate(grids):
            n = 0 if grid is None else cfg.num_image_tokens(*grid)
            ids[i, : n + 4] = [BOS, *[-1] * n, BOS, 7, 8]
        inputs = {
            "input_ids": ids,
            "attention_mask": (ids != PAD).astype(np.int32),
            "pixel_values": rng.standard_normal((2, cfg.max_crops, 3, side, side)).astype(np.float32),
            "image_sizes": np.asarray([(g[0] * side, g[1] * side) if g else (0, 0) for g in grids], np.int32),
        }
        hidden = forward(state, inputs)
        assert hidden.shape == (2, length, 64) and bool(jnp.isfinite(hidden).all())
    assert forward._cache_size() == 1


def test_cli_round_trip_is_bit_exact(reference, tmp_path):
    src = reference[0]
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert main(["to-jax", "--hf-dir", str(src), "--out", str(ckpt), "--no-progress"]) == 0
    assert main(["to-hf", "--ckpt", str(ckpt), "--out", str(back), "--no-progress"]) == 0
    assert_bit_identical(tensors(src), tensors(back))
    assert json.loads((back / "config.json").read_text())["model_type"] == "phi3_v"
    _, info = RefModel.from_pretrained(back, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info


def test_stored_wte_alias_is_skipped(reference, ours, tmp_path):
    """Some checkpoints also store vision_embed_tokens.wte (the same tensor as embed_tokens)."""
    src = shutil.copytree(reference[0], tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    tensors["model.vision_embed_tokens.wte.weight"] = tensors["model.embed_tokens.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    loaded = load_hf_model(src, progress=False)
    a, b = nnx.state(loaded.model).flat_state(), nnx.state(ours.model).flat_state()
    assert [p for p, _ in a] == [p for p, _ in b]
    assert all(np.array_equal(x.get_value(), y.get_value()) for (_, x), (_, y) in zip(a, b, strict=True))


def test_config_translation_round_trips_and_runtime_fields_propagate(reference):
    spec = SPECS["phi3_v"]
    hf = json.loads((reference[0] / "config.json").read_text())
    cfg = spec.from_hf(hf)
    assert cfg.vision.num_hidden_layers == 2 and cfg.vision.hidden_size == 1024
    assert cfg.text.family == "phi3" and cfg.text.rope_scaling is not None
    exported = spec.to_hf(cfg)
    assert exported["rope_scaling"]["type"] == "su"
    RefConfig(**exported)  # the remote config validates rope_scaling
    assert spec.from_hf(exported) == cfg
    fast = with_runtime(cfg, dtype="bfloat16", attention="xla", remat="full")
    assert (fast.text.dtype, fast.vision.dtype) == ("bfloat16", "bfloat16")
    assert (fast.text.attention, fast.vision.attention, fast.text.remat) == ("xla", "xla", "full")


def test_num_crops_comes_from_the_preprocessor_config(reference, tmp_path):
    hf_dir = tmp_path / "hf"
    shutil.copytree(reference[0], hf_dir)
    mesh = make_mesh(devices=jax.devices()[:1])
    assert load_hf_model(hf_dir, mesh, progress=False).config.num_crops == 4  # none: the checkpoints' 4
    (hf_dir / "preprocessor_config.json").write_text(json.dumps({"num_crops": 16, "num_img_tokens": 144}))
    loaded = load_hf_model(hf_dir, mesh, progress=False)
    assert loaded.config.num_crops == 16 and loaded.config.max_crops == 17

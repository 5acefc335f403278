"""LLaVA-NeXT: parity with transformers (fp32, <= 1e-4), static shapes under jit, conversion and configs."""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from helpers import hf_models
from helpers.layouts import RENAMES, assert_renamed_checkpoint_loads_the_same
from helpers.tensors import assert_bit_identical, tensors
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import unpad_image

from convert.__main__ import main
from unime_jax.backbones import UnsupportedModelError, with_runtime
from unime_jax.backbones.llava_next import LLAVA_V16_PINPOINTS
from unime_jax.backbones.llava_next.hf_config import llava_next_from_hf, llava_next_to_hf
from unime_jax.conversion import load_hf_model
from unime_jax.model_io import read_model_config
from unime_jax.models.clip import CLIPVisionConfig
from unime_jax.models.decoder import DecoderConfig
from unime_jax.models.llava_next import LlavaNextConfig, anyres_layout, unpadded_grid
from unime_jax.sharding import make_mesh

TOL = 1e-4
TILE = 28  # tiny CLIP: 28×28-pixel tiles of 7×7 patches, so 4×4 features per tile
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]  # llava-hf's, scaled by 28/336
VOCAB = 512
IMAGE = 500  # image_token_index
SEQ = 104  # longest prompt (88 image tokens plus text) fits
PATCHES = 5  # max_image_patches: base tile plus the 2×2 grid

# (height, width) of the test images and what makes each interesting.
SQUARE = (28, 28)  # ties between 1×2 and 2×1: the first pinpoint (1×2) wins; columns cut
WIDE = (30, 40)  # 2×2 grid, rows cut
TALL = (90, 20)  # 3×1 grid, columns cut
PANORAMA = (20, 90)  # 1×3 grid, rows cut
FULL = (61, 57)  # 2×2 grid, nothing cut: the longest sequence (max_image_tokens)
PORTRAIT = (50, 23)  # 2×1 grid


def _hf_llava_next(out: Path, seed: int = 0) -> Path:
    return hf_models.llava_next(out, seed, image_size=TILE, pinpoints=PINPOINTS, image_token_index=IMAGE)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = _hf_llava_next(tmp_path_factory.mktemp("llava_next") / "hf")
    ref = transformers.LlavaNextForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    return path, ref.eval(), load_hf_model(path, progress=False)


_PROCESSOR = transformers.LlavaNextImageProcessor(
    size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
)


def _image(size: tuple[int, int], seed: int) -> dict[str, np.ndarray]:
    """HF's slow (PIL) processor output for a random image: pixel_values (1, tiles, 3, 28, 28), image_sizes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return dict(_PROCESSOR(Image.fromarray(pixels), return_tensors="np"))


def _grid(size: tuple[int, int], pinpoints=PINPOINTS, tile: int = TILE) -> list[int]:
    height, width = select_best_resolution(size, pinpoints)
    return [height // tile, width // tile]


def _num_image_tokens(ref, image: dict[str, np.ndarray]) -> int:
    """The true count: the length of HF's packed feature sequence for the image."""
    with torch.no_grad():
        (features,) = ref.model.get_image_features(
            torch.tensor(image["pixel_values"]), torch.tensor(image["image_sizes"])
        )
    return features.shape[0]


def _batch(ref, rows: list[tuple[list[int], tuple[int, int] | None, list[int]]]):
    """Right-padded model inputs for rows of (text before, image size or None, text after), and
    HF's final hidden states of each row (run alone, unpadded)."""
    inputs = {
        "input_ids": np.zeros((len(rows), SEQ), np.int32),
        "attention_mask": np.zeros((len(rows), SEQ), np.int32),
        "pixel_values": np.zeros((len(rows), PATCHES, 3, TILE, TILE), np.float32),
        "image_sizes": np.zeros((len(rows), 2), np.int32),
        "image_grids": np.zeros((len(rows), 2), np.int32),
    }
    expected = []
    for i, (before, size, after) in enumerate(rows):
        hf_kwargs = {}
        ids = list(before)
        if size is not None:
            image = _image(size, seed=i)
            ids += [IMAGE] * _num_image_tokens(ref, image)
            tiles = image["pixel_values"].shape[1]
            inputs["pixel_values"][i, :tiles] = image["pixel_values"][0]
            inputs["image_sizes"][i] = size
            inputs["image_grids"][i] = _grid(size)
            hf_kwargs = {k: torch.tensor(v) for k, v in image.items()}
        ids += after
        inputs["input_ids"][i, : len(ids)] = ids
        inputs["attention_mask"][i, : len(ids)] = 1
        with torch.no_grad():
            out = ref(input_ids=torch.tensor([ids]), output_hidden_states=True, **hf_kwargs)
        expected.append(out.hidden_states[-1][0].numpy())
    return inputs, expected


def _max_real_diff(ours: np.ndarray, expected: list[np.ndarray]) -> float:
    return max(float(np.abs(ours[i, : len(e)] - e).max()) for i, e in enumerate(expected))


TEXT = [1, 17, 42, 99, 7]
BATCH_A = [
    (TEXT, None, [8, 9]),  # text only
    ([], SQUARE, []),  # image only
    ([1, 5], WIDE, [6, 7, 8]),  # image and text
    ([1, 11, 12], TALL, [13]),
]
BATCH_B = [  # same shapes, other aspect ratios and grids in every row
    ([1, 3], PANORAMA, [4, 5]),
    ([1], FULL, [2, 3, 4]),
    ([1, 2], PORTRAIT, []),
    (TEXT + TEXT, None, []),
]


@pytest.fixture(scope="module")
def jitted(llava):
    _, _, loaded = llava
    graphdef, state = nnx.split(loaded.model)

    @jax.jit
    def forward(state, inputs):
        return nnx.merge(graphdef, state)(**inputs)

    return lambda inputs: np.asarray(forward(state, inputs)), forward


@pytest.mark.parametrize("rows", [BATCH_A, BATCH_B], ids=["batch_a", "batch_b"])
def test_final_hidden_states_match_transformers(llava, jitted, rows):
    _, ref, loaded = llava
    assert (loaded.config.max_image_patches, loaded.config.max_image_tokens) == (PATCHES, 88)
    inputs, expected = _batch(ref, rows)
    # Every row's placeholder count is the count the model packs.
    _, _, count = anyres_layout(
        inputs["image_sizes"], inputs["image_grids"], side=4, length=loaded.config.max_image_tokens
    )
    np.testing.assert_array_equal(count, (inputs["input_ids"] == IMAGE).sum(1))
    run, _ = jitted
    assert _max_real_diff(run(inputs), expected) <= TOL


def test_text_only_batch_is_the_language_model(llava):
    _, ref, loaded = llava
    inputs, expected = _batch(ref, [(TEXT, None, [8, 9]), ([1, 2, 3], None, [])])
    ours = loaded.model(
        jnp.asarray(inputs["input_ids"]), attention_mask=jnp.asarray(inputs["attention_mask"])
    )
    assert _max_real_diff(np.asarray(ours), expected) <= TOL


def test_batches_with_other_aspect_ratios_reuse_one_compilation(llava, jitted):
    _, ref, _ = llava
    run, forward = jitted
    for rows in (BATCH_A, BATCH_B):
        run(_batch(ref, rows)[0])
    assert forward._cache_size() == 1


def test_sharded_forward_matches_transformers(llava):
    """Over a (data, fsdp, tensor) = (2, 2, 2) mesh of fake devices, rows split over data and fsdp."""
    path, ref, _ = llava
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = load_hf_model(path, mesh, progress=False)
    kernel = sharded.model.multi_modal_projector.linear_1.kernel[...]
    assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
    inputs, expected = _batch(ref, BATCH_A)
    graphdef, state = nnx.split(sharded.model)

    @jax.jit
    def forward(state, inputs):
        return nnx.merge(graphdef, state)(**inputs)

    with jax.set_mesh(mesh):
        rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        out = forward(state, {k: jax.device_put(v, rows) for k, v in inputs.items()})
    assert out.sharding.spec[0] == ("data", "fsdp")
    assert _max_real_diff(np.asarray(out), expected) <= TOL


def test_unpadding_matches_transformers():
    """Integer unpadding equals HF's float `unpad_image` (window size and offset) at llava-hf scale."""
    rng = np.random.default_rng(0)
    sizes = np.concatenate(
        [rng.integers(1, 3000, (200, 2)), [[336, 336], [480, 640], [640, 480], [1000, 300], [1, 2999]]]
    ).astype(np.int32)
    for pin_h, pin_w in LLAVA_V16_PINPOINTS:
        grid = np.broadcast_to(np.array([pin_h // 336, pin_w // 336], np.int32), sizes.shape)
        rows, cols, top, left = map(np.asarray, unpadded_grid(jnp.asarray(sizes), jnp.asarray(grid), 24))
        cur_h, cur_w = grid[0, 0] * 24, grid[0, 1] * 24
        canvas = torch.arange(cur_h * cur_w).reshape(1, cur_h, cur_w)
        for i, size in enumerate(sizes.tolist()):
            kept = unpad_image(canvas, size)
            assert (rows[i], cols[i]) == tuple(kept.shape[1:]), (size, pin_h, pin_w)
            if kept.numel():  # extreme aspect ratios can keep nothing
                assert top[i] * cur_w + left[i] == kept[0, 0, 0], (size, pin_h, pin_w)


def _llava_v16_config(**overrides) -> LlavaNextConfig:
    text = DecoderConfig(
        family="mistral",
        vocab_size=32064,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    return LlavaNextConfig(
        **{
            "text": text,
            "vision": CLIPVisionConfig(),
            "image_grid_pinpoints": LLAVA_V16_PINPOINTS,
            **overrides,
        }
    )


@pytest.mark.parametrize(
    ("width", "height", "tokens"),
    [(336, 336, 1176), (1344, 1344, 2928), (640, 480, 2340), (480, 640, 2352), (300, 1000, 2232)],
)
def test_token_counts_of_llava_v16(width, height, tokens):
    """The counts transformers' processor and model give for llava-hf's LLaVA-1.6."""
    cfg = _llava_v16_config()
    assert (cfg.max_image_patches, cfg.max_image_tokens) == (5, 2928)
    grid = _grid((height, width), LLAVA_V16_PINPOINTS, 336)
    _, _, count = anyres_layout(
        np.array([[height, width]]), np.array([grid]), side=24, length=cfg.max_image_tokens
    )
    assert int(count[0]) == tokens


def test_packing_order_matches_transformers_at_llava_v16_scale():
    """Our gather layout reproduces HF's `pack_image_features` exactly on 24×24-feature tiles."""
    cfg = _llava_v16_config()
    hf = types.SimpleNamespace(config=transformers.LlavaNextConfig())  # llava-hf geometry
    sizes = [(336, 336), (480, 640), (640, 480), (1000, 300), (300, 1000), (1344, 1344), (570, 1141)]
    rng = np.random.default_rng(0)
    table = rng.standard_normal((len(sizes), cfg.max_image_patches, 576, 3)).astype(np.float32)
    newline = rng.standard_normal(3).astype(np.float32)
    grids = np.array([_grid(s, LLAVA_V16_PINPOINTS, 336) for s in sizes])
    index, is_newline, count = map(
        np.asarray,
        anyres_layout(np.array(sizes), grids, side=24, length=cfg.max_image_tokens),
    )
    for i, size in enumerate(sizes):
        tiles = 1 + grids[i, 0] * grids[i, 1]
        (expected,), _ = transformers.LlavaNextModel.pack_image_features(
            hf, [torch.tensor(table[i, :tiles])], torch.tensor([size]), "default", torch.tensor(newline)
        )
        ours = np.where(is_newline[i, :, None], newline, table[i].reshape(-1, 3)[index[i]])
        np.testing.assert_array_equal(ours[: count[i]], expected.numpy())


def test_cli_round_trip_is_bit_exact(llava, tmp_path):
    src, _, loaded = llava
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert main(["to-jax", "--hf-dir", str(src), "--out", str(ckpt), "--no-progress"]) == 0
    assert read_model_config(ckpt)[1] == loaded.config
    assert main(["to-hf", "--ckpt", str(ckpt), "--out", str(back), "--no-progress"]) == 0
    assert_bit_identical(tensors(src), tensors(back))
    _, info = transformers.LlavaNextForConditionalGeneration.from_pretrained(back, output_loading_info=True)
    assert all(not keys for keys in info.values()), info


@pytest.mark.parametrize("layout", sorted(RENAMES))
def test_other_key_layouts_load_the_same_parameters(llava, tmp_path, layout):
    src, _, loaded = llava
    assert_renamed_checkpoint_loads_the_same(src, loaded, RENAMES[layout], tmp_path)


# Shaped like llava-hf/llava-v1.6-mistral-7b-hf's config.json: its sub-configs hold only the fields
# that differ from transformers' defaults (no hidden_size, num_hidden_layers, ...).
HUB_CONFIG = {
    "architectures": ["LlavaNextForConditionalGeneration"],
    "ignore_index": -100,
    "image_grid_pinpoints": [list(p) for p in LLAVA_V16_PINPOINTS],
    "image_token_index": 32000,
    "model_type": "llava_next",
    "projector_hidden_act": "gelu",
    "text_config": {
        "architectures": ["MistralForCausalLM"],
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
        "vocab_size": 32064,
    },
    "torch_dtype": "float16",
    "use_image_newline_parameter": True,
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}


def _v5_form(hf: dict) -> dict:
    """The transformers 5 spelling: rope_parameters and dtype."""
    hf = copy.deepcopy(hf)
    text = hf["text_config"]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
    text["dtype"] = text.pop("torch_dtype")
    hf["dtype"] = hf.pop("torch_dtype")
    return hf


def test_hub_config_is_completed_with_transformers_defaults():
    cfg = llava_next_from_hf(HUB_CONFIG)
    text = cfg.text
    assert (text.family, text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (
        "mistral",
        4096,
        32,
        32,
    )
    assert (text.num_key_value_heads, text.head_dim, text.rope_theta, text.sliding_window) == (
        8,
        128,
        1e6,
        None,
    )
    assert cfg.vision == CLIPVisionConfig()  # CLIP-L/14-336
    assert (cfg.image_token_index, cfg.image_grid_pinpoints, cfg.vision_feature_layer) == (
        32000,
        LLAVA_V16_PINPOINTS,
        -2,
    )
    assert (cfg.max_image_patches, cfg.max_image_tokens) == (5, 2928)
    assert llava_next_from_hf(_v5_form(HUB_CONFIG)) == cfg


@pytest.mark.parametrize("family", ["mistral", "llama"])
def test_generated_config_round_trips_through_transformers(family):
    hub = copy.deepcopy(HUB_CONFIG)
    hub["text_config"]["model_type"] = family
    cfg = llava_next_from_hf(hub)
    assert cfg.text.family == family
    generated = llava_next_to_hf(cfg)
    loaded = transformers.LlavaNextConfig(**copy.deepcopy(generated))
    assert loaded.text_config.model_type == family
    assert loaded.text_config.num_key_value_heads == 8
    assert loaded.vision_config.hidden_size == 1024
    assert llava_next_from_hf(json.loads(json.dumps(generated))) == cfg


def test_runtime_fields_reach_both_towers():
    cfg = with_runtime(
        _llava_v16_config(), dtype="bfloat16", param_dtype="bfloat16", attention="xla", remat="full"
    )
    assert (cfg.text.dtype, cfg.text.param_dtype, cfg.text.attention, cfg.text.remat) == (
        "bfloat16",
        "bfloat16",
        "xla",
        "full",
    )
    assert (cfg.vision.dtype, cfg.vision.param_dtype, cfg.vision.attention) == ("bfloat16", "bfloat16", "xla")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda hf: hf["text_config"].update(model_type="qwen2"), "text_config model_type 'qwen2'"),
        (lambda hf: hf["vision_config"].update(model_type="siglip_vision_model"), "vision_config model_type"),
        (lambda hf: hf.update(vision_feature_select_strategy="full"), "must be 'default'"),
        (lambda hf: hf.update(vision_feature_layer=[-2, -5]), "several vision_feature_layer"),
    ],
)
def test_unsupported_configs_are_named(edit, message):
    hf = copy.deepcopy(HUB_CONFIG)
    edit(hf)
    with pytest.raises(UnsupportedModelError, match=message):
        llava_next_from_hf(hf)


def test_pinpoints_must_tile_the_clip_input():
    with pytest.raises(ValueError, match="multiples of the CLIP image size 336"):
        _llava_v16_config(image_grid_pinpoints=((336, 700),))

"""LLaVA-OneVision: parity with transformers (fp32, <= 1e-4) of the Qwen2 decoder and the whole model,
the anyres_max layout at full scale, the image processor, prompts, conversion both ways and configs."""

from __future__ import annotations

import copy
import functools
import json
import types

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from helpers.layouts import RENAMES, assert_renamed_checkpoint_loads_the_same
from helpers.onevision import (
    ASPECT,
    IMAGE_TOKEN,
    PINPOINTS,
    SIDE,
    TOL,
    Reference,
    qwen2_tokenizer,
    random_image,
    write_tiny_onevision,
)
from helpers.tensors import assert_bit_identical, tensors
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from convert.__main__ import main
from unime_jax.backbones import UnsupportedModelError, spec_for
from unime_jax.backbones.llava_onevision import LLAVA_OV_PINPOINTS, TEMPLATES
from unime_jax.backbones.llava_onevision.hf_config import llava_onevision_from_hf
from unime_jax.backbones.llava_onevision.images import LlavaOnevisionImageProcessor
from unime_jax.conversion import load_hf_model
from unime_jax.models.clip import normalize_pixels
from unime_jax.models.llava_onevision import onevision_layout

SPEC = spec_for("llava_onevision")

# (height, width) of the test images and what each exercises at the tiny geometry (4×4 features a tile).
SQUARE = (30, 30)  # 1×1 grid, nothing cut or downscaled: 16 + 4·5 tokens
WIDE = (30, 40)  # 1×2 grid, columns cut to 4×6, under the budget (32 features ×1.21)
NARROW = (90, 20)  # 3×1 grid, columns cut to 12×2
FULL = (61, 57)  # 2×2 grid, uncut 8×8, downscaled to 5×5
TALL = (123, 45)  # 3×1 grid, cut to 10×4, downscaled to 8×3 (unequal scales)
PANORAMA = (20, 90)  # 1×3 grid, rows cut to 2×12
PORTRAIT = (50, 23)  # 2×1 grid, columns cut to 8×4


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    path = write_tiny_onevision(tmp_path_factory.mktemp("llava_onevision") / "hf")
    return path, Reference(path), load_hf_model(path, progress=False)


def _max_real_diff(ours: np.ndarray, expected: list[np.ndarray]) -> float:
    return max(float(np.abs(ours[i, : len(e)] - e).max()) for i, e in enumerate(expected))


# ------------------------------------------------------------------------------------------------
# Qwen2 decoder


def test_qwen2_decoder_matches_transformers_and_round_trips(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=1e6,
    )
    ref = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero q/k/v biases, so a dropped bias shows
        for layer in ref.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    ref.save_pretrained(tmp_path / "hf")
    loaded = load_hf_model(tmp_path / "hf", progress=False)
    assert loaded.config.qkv_bias and not loaded.config.attention_bias
    ids = np.array([[5, 9, 200, 17, 3, 3, 8, 1], [7, 7, 42, 0, 0, 0, 0, 0]], np.int32)
    mask = np.array([[1] * 8, [1] * 3 + [0] * 5], np.int32)
    ours = np.asarray(loaded.model(ids, attention_mask=mask))
    with torch.no_grad():
        expected = ref(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    hidden = expected.hidden_states[-1].numpy()
    assert np.abs(ours[0] - hidden[0]).max() <= TOL
    assert np.abs(ours[1, :3] - hidden[1, :3]).max() <= TOL
    assert (
        main(["to-jax", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--no-progress"])
        == 0
    )
    assert (
        main(["to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"), "--no-progress"])
        == 0
    )
    assert_bit_identical(tensors(tmp_path / "hf"), tensors(tmp_path / "back"))


def test_qwen2_sliding_window_is_refused():
    hf = {"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8}
    hf |= {"num_hidden_layers": 1, "num_attention_heads": 1, "use_sliding_window": True}
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        spec_for("qwen2").from_hf(hf)


# ------------------------------------------------------------------------------------------------
# The anyres_max layout at OneVision's own scale (27×27 features a tile, anyres_max_9, 36 pinpoints)


@pytest.mark.parametrize(
    "size",
    [(336, 336), (384, 384), (700, 1000), (1000, 700), (2300, 400), (300, 2000), (3000, 3000), (1500, 1499)],
)
def test_layout_matches_transformers_pack_image_features_at_full_scale(size):
    """Our gather-and-blend layout reproduces HF's `pack_image_features` (unpad, bilinear downscale,
    newlines) on random tile features, unpadded maps above the budget included."""
    processor = LlavaOnevisionImageProcessor()
    grid = processor.image_grid(*size)
    tiles = 1 + grid[0] * grid[1]
    features = torch.randn(tiles, 27 * 27, 3, generator=torch.Generator().manual_seed(sum(size)))
    newline = torch.tensor([7.0, -7.0, 70.0])
    hf_self = types.SimpleNamespace(
        config=types.SimpleNamespace(
            vision_config=types.SimpleNamespace(image_size=384, patch_size=14),
            image_grid_pinpoints=[list(p) for p in LLAVA_OV_PINPOINTS],
        )
    )
    (expected,), _ = LlavaOnevisionModel.pack_image_features(
        hf_self, [features], torch.tensor([size]), image_newline=newline, vision_aspect_ratio="anyres_max_9"
    )
    assert expected.shape[0] == processor.num_tokens(*size)
    grids = np.array([[*grid, *processor.feature_grid(*size)]], np.int32)
    index, weight, is_newline, count = onevision_layout(
        np.array([size], np.int32), grids, side=27, length=expected.shape[0] + 5
    )
    assert int(count[0]) == expected.shape[0]
    table = features.numpy().reshape(-1, 3)
    ours = (table[np.asarray(index[0])] * np.asarray(weight[0])[..., None]).sum(1)
    ours = np.where(np.asarray(is_newline[0])[:, None], newline.numpy(), ours)[: expected.shape[0]]
    np.testing.assert_allclose(ours, expected.numpy(), rtol=0, atol=1e-5)


def test_token_counts_of_llava_onevision():
    """A 336² image (UniME's "Res336") is one 384² tile: 729 + 27·28; the largest grids are capped."""
    processor = LlavaOnevisionImageProcessor()
    assert processor.num_tokens(336, 336) == 729 + 27 * 28
    assert processor.feature_grid(2304, 2304) == (81, 81)  # 162×162 shrunk by sqrt(4): 729·9 features
    cfg = llava_onevision_from_hf(copy.deepcopy(HUB_CONFIG))
    assert cfg.max_image_patches == 37 and cfg.max_image_tokens >= processor.num_tokens(2304, 2304)


# ------------------------------------------------------------------------------------------------
# The whole model


def _batch(
    ref: Reference, rows: list[tuple[str, tuple[int, int] | None]], seed: int = 0, length: int | None = None
):
    """Our featurizer's right-padded batch for rows of (raw prompt, image size or None), and HF's
    final hidden states of each row run alone, with its own processor's pixels."""
    featurizer = SPEC.featurizer(load_cfg(ref), ref.tokenizer, max_len=64, raw=True)
    ids, images, expected = [], [], []
    for i, (prompt, size) in enumerate(rows):
        image = None if size is None else random_image(size, seed + i)
        arrays, count = (None, None) if image is None else featurizer.process_image(image)
        row_ids, _ = featurizer.token_ids(prompt, count)
        assert row_ids == ref.ids(featurizer.prompt.image_prompt(prompt) if image else prompt, image)
        ids.append(row_ids)
        images.append(arrays)
        expected.append(ref.hidden(featurizer.prompt.image_prompt(prompt) if image else prompt, image))
    return featurizer.collate(ids, images, length), expected


def load_cfg(ref: Reference):
    return llava_onevision_from_hf(ref.model.config.to_dict())


BATCH = [
    ("A dog runs along the beach.", None),  # text only
    ("<image>", SQUARE),  # image only, not downscaled
    ("<image>\nRepresent the given image.", FULL),  # downscaled 2×2 grid
    ("What is it?", TALL),  # downscaled 3×1 grid, the placeholder prepended
    ("<image>", NARROW),
    ("<image>\nFind a caption.", WIDE),
]


def test_final_hidden_states_match_transformers(onevision):
    _, ref, loaded = onevision
    inputs, expected = _batch(ref, BATCH, length=96)
    assert inputs["image_grids"].shape == (len(BATCH), 4)
    graphdef, state = nnx.split(loaded.model)
    forward = jax.jit(lambda state, inputs: nnx.merge(graphdef, state)(**inputs))
    assert _max_real_diff(np.asarray(forward(state, inputs)), expected) <= TOL
    # Other sizes, grids and downscales in every row: the same compiled program.
    inputs, expected = _batch(
        ref,
        [("<image>", PANORAMA), ("Rain.", None), ("x", PORTRAIT), ("y", SQUARE), ("z", FULL), ("w", WIDE)],
        seed=9,
        length=96,
    )
    assert _max_real_diff(np.asarray(forward(state, inputs)), expected) <= TOL
    assert forward._cache_size() == 1


def test_llava_next_width_grids_are_refused_in_one_line(onevision):
    _, ref, loaded = onevision
    inputs, _ = _batch(ref, [("<image>", SQUARE)])
    inputs["image_grids"] = inputs["image_grids"][:, :2]  # LLaVA-NeXT's (tile rows, tile cols) only
    message = r"image_grids must be \(B, 4\), \(tile rows, tile cols, feature rows, feature cols\) per image; got shape \(1, 2\)"
    with pytest.raises(ValueError, match=message):
        loaded.model(**inputs)


def test_text_only_batch_is_the_language_model(onevision):
    _, ref, loaded = onevision
    inputs, expected = _batch(ref, [("A red circle above a blue square.", None), ("Rain.", None)])
    assert "pixel_values" not in inputs
    assert _max_real_diff(np.asarray(loaded.model(**inputs)), expected) <= TOL


def test_pixels_equal_transformers_image_processor(onevision):
    """Our uint8 tiles, normalised as the tower does it, are HF's float pixels (one float32 ulp)."""
    _, ref, loaded = onevision
    inputs = SPEC.inputs(loaded.config)
    for i, size in enumerate([SQUARE, WIDE, NARROW, FULL, TALL, PANORAMA, PORTRAIT, (12, 200)]):
        image = random_image(size, 20 + i)
        arrays, count = inputs.process(image)
        expected = ref.image_processor(image, return_tensors="np")
        tiles = expected["pixel_values"].shape[1]
        assert inputs.num_tiles(arrays) == tiles
        ours = normalize_pixels(
            arrays["pixel_values"][:tiles], loaded.config.vision.image_mean, loaded.config.vision.image_std
        )
        np.testing.assert_allclose(ours, expected["pixel_values"][0], rtol=0, atol=1e-6)
        assert tuple(arrays["image_sizes"]) == tuple(expected["image_sizes"][0])
        assert count == ref.num_image_tokens(image), size


def test_templates_are_the_chat_template_rendering():
    tokenizer = qwen2_tokenizer()
    text = [
        {"role": "user", "content": [{"type": "text", "text": "{text}\nSummary above sentence in one word:"}]}
    ]
    image = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Summary above image in one word:"}],
        }
    ]
    assert tokenizer.apply_chat_template(text, tokenize=False, add_generation_prompt=True) == TEMPLATES.text
    assert tokenizer.apply_chat_template(image, tokenize=False, add_generation_prompt=True) == TEMPLATES.image
    assert tokenizer("<image>", add_special_tokens=False)["input_ids"] == [IMAGE_TOKEN]


# ------------------------------------------------------------------------------------------------
# Conversion


def test_cli_round_trip_is_bit_exact_and_loads_in_transformers(onevision, tmp_path):
    src, _, _ = onevision
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert main(["to-jax", "--hf-dir", str(src), "--out", str(ckpt), "--no-progress"]) == 0
    assert main(["to-hf", "--ckpt", str(ckpt), "--out", str(back), "--no-progress"]) == 0
    assert_bit_identical(tensors(src), tensors(back))
    assert (back / "preprocessor_config.json").is_file() and (back / "tokenizer.json").is_file()
    _, info = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
        back, output_loading_info=True
    )
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info


def test_generated_config_round_trips_through_transformers(onevision, tmp_path):
    """Without the source config.json, the config we write loads in transformers as the same model."""
    _, _, loaded = onevision
    hf = SPEC.to_hf(loaded.config)
    rebuilt = transformers.AutoConfig.for_model(**copy.deepcopy(hf))
    assert llava_onevision_from_hf(rebuilt.to_dict()) == llava_onevision_from_hf(hf)
    assert rebuilt.vision_aspect_ratio == ASPECT and rebuilt.image_grid_pinpoints == PINPOINTS


@pytest.mark.parametrize("layout", sorted(RENAMES))
def test_other_key_layouts_load_the_same_parameters(onevision, tmp_path, layout):
    src, _, loaded = onevision
    assert_renamed_checkpoint_loads_the_same(src, loaded, RENAMES[layout], tmp_path)


# ------------------------------------------------------------------------------------------------
# Configs

# Shaped like llava-hf/llava-onevision-qwen2-7b-ov-hf's config.json: sub-configs hold only what
# differs from transformers' defaults.
HUB_CONFIG = {
    "architectures": ["LlavaOnevisionForConditionalGeneration"],
    "image_grid_pinpoints": [list(p) for p in LLAVA_OV_PINPOINTS],
    "image_token_index": 151646,
    "model_type": "llava_onevision",
    "projector_hidden_act": "gelu",
    "text_config": {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "model_type": "qwen2",
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "use_sliding_window": False,
        "vocab_size": 152128,
    },
    "tie_word_embeddings": False,
    "video_token_index": 151647,
    "vision_aspect_ratio": "anyres_max_9",
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 384,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 26,
        "patch_size": 14,
        "vision_use_head": False,
    },
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full",
}


def test_hub_config_is_completed_with_transformers_defaults():
    cfg = llava_onevision_from_hf(copy.deepcopy(HUB_CONFIG))
    text, vision = cfg.text, cfg.vision
    assert (text.family, text.head_dim, text.rms_norm_eps, text.qkv_bias) == ("qwen2", 128, 1e-6, True)
    assert text.sliding_window is None and text.rope_theta == 1e6
    assert (vision.hidden_size, vision.image_size, vision.hidden_act) == (1152, 384, "gelu_pytorch_tanh")
    assert (cfg.tile_side, cfg.anyres_max, cfg.image_token_index) == (27, 9, 151646)
    assert SPEC.lora_targets(cfg, vision=True).startswith(r"language_model\.model\.layers")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda hf: hf["vision_config"].pop("vision_use_head"), "pooling head"),
        (lambda hf: hf.update(vision_feature_select_strategy="default"), "must be 'full'"),
        (lambda hf: hf.update(vision_feature_layer=[-2, -1]), "several vision_feature_layer"),
        (lambda hf: hf["text_config"].update(model_type="llama"), "text_config model_type 'llama'"),
        (lambda hf: hf["vision_config"].update(model_type="clip_vision_model"), "vision_config model_type"),
    ],
)
def test_unsupported_configs_are_named(edit, message):
    hf = copy.deepcopy(HUB_CONFIG)
    edit(hf)
    with pytest.raises(UnsupportedModelError, match=message):
        llava_onevision_from_hf(hf)


def test_preprocessor_statistics_reach_the_tower(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]})
    )
    settings = SPEC.processor_settings(tmp_path)
    cfg = llava_onevision_from_hf({**copy.deepcopy(HUB_CONFIG), **settings})
    assert cfg.vision.image_mean == (0.1, 0.2, 0.3) and cfg.vision.image_std == (1.0, 2.0, 3.0)
    assert SPEC.processor_settings(tmp_path / "absent") == {}
    assert llava_onevision_from_hf(copy.deepcopy(HUB_CONFIG)).vision.image_mean == (0.5, 0.5, 0.5)


def test_only_anyres_max_is_accepted():
    with pytest.raises(ValueError, match="anyres_max_N"):
        llava_onevision_from_hf({**copy.deepcopy(HUB_CONFIG), "vision_aspect_ratio": "anyres"})


def test_tiny_geometry_downscales(onevision):
    """The fixture really exercises the downscale: FULL and TALL exceed anyres_max_2, the rest do not."""
    _, _, loaded = onevision
    processor = SPEC.inputs(loaded.config).processor
    assert processor.feature_grid(*FULL) == (5, 5) and processor.feature_grid(*TALL) == (8, 3)
    assert processor.feature_grid(*SQUARE) == (SIDE, SIDE) and processor.feature_grid(*NARROW) == (12, 2)


# ------------------------------------------------------------------------------------------------
# Token counts against transformers' LlavaOnevisionProcessor


def _hf_processor(pinpoints, tile: int, side: int, aspect: str) -> types.SimpleNamespace:
    """The state `LlavaOnevisionProcessor`'s counting methods read, without its video processor
    (which needs torchvision): its own methods run unmodified on it."""
    state = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(image_grid_pinpoints=[list(p) for p in pinpoints]),
        num_image_tokens=side * side,
        vision_aspect_ratio=aspect,
        vision_feature_select_strategy="full",
    )
    state._get_unpadded_features = functools.partial(LlavaOnevisionProcessor._get_unpadded_features, state)
    state._get_number_of_features = functools.partial(LlavaOnevisionProcessor._get_number_of_features, state)
    return state


SIZES = [
    (336, 336),
    (384, 384),
    (480, 640),
    (640, 480),
    (1024, 768),
    (2000, 300),
    (300, 2000),
    (3000, 3000),
    (37, 1999),
]


def test_token_counts_equal_the_transformers_processor(onevision):
    _, ref, loaded = onevision
    full = _hf_processor(LLAVA_OV_PINPOINTS, 384, 27, "anyres_max_9")
    ours = LlavaOnevisionImageProcessor()
    for size in SIZES:
        assert ours.num_tokens(*size) == full._get_number_of_features(*size, 384, 384), size
    tiny = _hf_processor(PINPOINTS, 30, SIDE, ASPECT)
    inputs = SPEC.inputs(loaded.config)
    for size in [SQUARE, WIDE, NARROW, FULL, TALL, PANORAMA, PORTRAIT, (12, 200)]:
        assert inputs.num_tokens(*size) == tiny._get_number_of_features(*size, 30, 30), size
    # The processor widens the prompt's <image> before tokenising; our featurizer widens the id after.
    featurizer = SPEC.featurizer(loaded.config, ref.tokenizer, raw=True)
    prompt = "<image>\nRepresent the given image."
    (widened,), _ = LlavaOnevisionProcessor._expand_image_tokens(
        tiny, [prompt], iter([list(FULL)]), 30, 30, "<image>", iter([1])
    )
    count = inputs.num_tokens(*FULL)
    assert featurizer.token_ids(prompt, count)[0] == ref.tokenizer(widened)["input_ids"]

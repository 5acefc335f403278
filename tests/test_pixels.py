"""uint8 pixels normalised on the device give the float32 path's values and model outputs exactly.

LLaVA-NeXT ships its crops as uint8 (everything before the rescale is uint8); Phi-3.5-V keeps
float32, because its global view is resized after normalisation. The model takes both.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.tiny_configs import llava_config, phi3_v_config

from unime_jax.backbones.llava_next.inputs import LlavaNextInputs
from unime_jax.backbones.phi3_v.images import hd_transform
from unime_jax.backbones.phi3_v.inputs import Phi3VInputs
from unime_jax.models.clip import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CLIPVisionModel,
    normalize_pixels,
    pixel_table,
)
from unime_jax.models.decoder import DecoderConfig
from unime_jax.models.llava_next import LlavaNext
from unime_jax.processing.images import channels_first, split_into_crops, to_rgb

TOL = 1e-5
VOCAB, IMAGE = 512, 500  # tiny vocabulary; image_token_index


def _every_level() -> np.ndarray:
    """(1, 3, 16, 16) uint8 holding each of the 256 levels once per channel."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    return np.stack([levels, levels[::-1], levels.T])[None]


def _image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_the_table_is_the_float32_formula():
    levels = np.arange(256, dtype=np.float32)
    for c in range(3):
        expected = (levels / np.float32(255) - np.float32(OPENAI_CLIP_MEAN[c])) / np.float32(
            OPENAI_CLIP_STD[c]
        )
        np.testing.assert_array_equal(pixel_table(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)[c], expected)


def test_device_normalisation_equals_the_host_bit_for_bit():
    pixels = _every_level()
    host = normalize_pixels(pixels, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    device = jax.jit(lambda p: normalize_pixels(p, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))(pixels)
    assert host.dtype == device.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(device), host)
    with pytest.raises(TypeError, match="uint8"):
        normalize_pixels(host, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def test_the_tower_normalises_uint8_with_its_config_statistics():
    cfg = llava_config().vision
    tower = CLIPVisionModel(cfg, nnx.Rngs(0))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, cfg.image_size, cfg.image_size), dtype=np.uint8)
    normalized = normalize_pixels(pixels, cfg.image_mean, cfg.image_std)
    np.testing.assert_array_equal(
        np.asarray(tower.hidden_state(pixels)), np.asarray(tower.hidden_state(normalized))
    )
    other = dataclasses.replace(cfg, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    nnx.update(retuned := CLIPVisionModel(other, nnx.Rngs(0)), nnx.state(tower))
    assert not np.allclose(retuned.hidden_state(pixels), tower.hidden_state(pixels))


@pytest.fixture(scope="module")
def llava():
    cfg = llava_config()
    cfg = dataclasses.replace(
        cfg, text=DecoderConfig("mistral", VOCAB, 32, 64, 1, 4, 2, 8), image_token_index=IMAGE
    )
    return LlavaNextInputs(cfg), LlavaNext(cfg, nnx.Rngs(0))


def test_llava_ships_uint8_and_its_outputs_equal_the_float32_path(llava):
    """The float32 path is the old one: crops normalised on the host, unused tile slots 0.0."""
    inputs, model = llava
    images = [_image(30, 40, 1), _image(90, 20, 2)]  # a 2×2 and a 3×1 grid: 5 and 4 of 5 slots
    processed = [inputs.process(image) for image in images]
    rows = [arrays for arrays, _ in processed]
    assert all(row["pixel_values"].dtype == np.uint8 for row in rows)
    assert inputs.empty()["pixel_values"].dtype == np.uint8
    uint8 = np.stack([row["pixel_values"] for row in rows])
    float32 = np.zeros(uint8.shape, np.float32)
    for slots, image in zip(float32, images, strict=True):
        real = inputs.processor(image).pixel_values
        slots[: len(real)] = normalize_pixels(real, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    length = 8 + max(tokens for _, tokens in processed)
    ids = np.full((2, length), 7, np.int32)
    mask = np.zeros((2, length), np.int32)
    for i, (_, tokens) in enumerate(processed):
        ids[i, 1 : 1 + tokens] = IMAGE
        mask[i, : tokens + 4] = 1
    common = {
        "attention_mask": jnp.asarray(mask),
        "image_sizes": np.stack([row["image_sizes"] for row in rows]),
        "image_grids": np.stack([row["image_grids"] for row in rows]),
    }
    out_uint8 = model(jnp.asarray(ids), pixel_values=uint8, **common)
    out_float32 = model(jnp.asarray(ids), pixel_values=float32, **common)
    assert float(jnp.abs(out_uint8 - out_float32).max()) <= TOL
    np.testing.assert_array_equal(np.asarray(out_uint8), np.asarray(out_float32))  # in fact bit for bit


def test_phi3_v_keeps_float32_and_only_its_global_view_is_not_uint8():
    """The HD crops are uint8-exact (white padding is level 255); the global view is a bicubic of
    the normalised image, and the padding crops are 0.0 in CLIP space: neither is a uint8 level."""
    inputs = Phi3VInputs(phi3_v_config())
    image = _image(20, 50, 3)  # aspect 2.5: a 1x2 grid of 28-pixel crops, 2 of the 4 crop slots
    arrays, _ = inputs.process(image)
    assert arrays["pixel_values"].dtype == inputs.empty()["pixel_values"].dtype == np.float32
    size = inputs.cfg.crop_size
    hd = channels_first(hd_transform(to_rgb(image), inputs.cfg.num_crops, size))
    crops = split_into_crops(hd, size)
    assert len(crops) == 2
    normalized = normalize_pixels(crops, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    np.testing.assert_array_equal(arrays["pixel_values"][1:3], normalized)
    table = pixel_table(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    global_view = arrays["pixel_values"][0]
    assert not all(np.isin(global_view[c], table[c]).all() for c in range(3))
    assert not np.isin(0.0, table).any()  # the padding crops' value

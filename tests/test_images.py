"""Image processors against their PyTorch references (LLaVA-NeXT: transformers' slow processor;
Phi-3.5-V: VLM2Vec's ``image_processing_phi3_v``) and against independent computations.

The Phi-3.5-V reference imports torchvision, which does not install beside the main env's torch: it
runs unmodified in its own interpreter (``bash scripts/reference_env.sh`` makes it), which
``UNIME_REFERENCE_PYTHON`` names, through tests/reference_phi3v_processor.py in one subprocess."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.reference import run_reference
from PIL import Image

from unime_jax.backbones.llava_next.images import (
    LLAVA_V16_PINPOINTS,
    LlavaNextImageProcessor,
    select_best_resolution,
    unpad_shape,
)
from unime_jax.backbones.phi3_v.images import Phi3VImageProcessor, hd_transform, resize_bicubic_like_torch
from unime_jax.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize_pixels
from unime_jax.processing.images import to_rgb

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")

TOL = 1e-5


def _random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _gradient_image(height: int, width: int) -> np.ndarray:
    """Smooth content, where resampling errors are not hidden by noise."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1).astype(
        np.uint8
    )


# name -> (H, W, 3) uint8: real photos plus generated images of awkward sizes and aspect ratios.
IMAGES = {
    "astronaut_512x512": lambda: skimage_data.astronaut(),
    "chelsea_300x451": lambda: skimage_data.chelsea(),
    "coffee_400x600": lambda: skimage_data.coffee(),
    "rocket_427x640": lambda: skimage_data.rocket(),
    "chelsea_portrait_451x300": lambda: np.ascontiguousarray(skimage_data.chelsea().transpose(1, 0, 2)),
    "tiny_50x30": lambda: _random_image(50, 30, 1),
    "tiny_30x50": lambda: _random_image(30, 50, 2),
    "square_336": lambda: _gradient_image(336, 336),
    "large_1344": lambda: _gradient_image(1344, 1344),
    "tall_1001x217": lambda: _random_image(1001, 217, 3),
    "wide_301x997": lambda: _gradient_image(301, 997),
}


def _max_error(actual: np.ndarray, expected: np.ndarray) -> float:
    assert actual.shape == expected.shape
    return float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max())


# --------------------------------------------------------------------------------------------
# LLaVA-NeXT
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_llava_image_processor():
    return transformers.LlavaNextImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=[list(p) for p in LLAVA_V16_PINPOINTS],
        do_pad=False,
    )


@pytest.fixture(scope="module")
def hf_llava_processor(hf_llava_image_processor):
    """The real ``LlavaNextProcessor`` with llava-hf's processor_config and a two-word tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", additional_special_tokens=["<image>"]
    )
    return transformers.LlavaNextProcessor(
        image_processor=hf_llava_image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def test_llava_defaults_are_the_mistral_checkpoint():
    processor = LlavaNextImageProcessor()
    assert processor.image_grid_pinpoints == ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    assert (processor.crop_size, processor.patch_size) == (336, 14)
    assert processor.max_crops == 5
    assert processor.max_num_tokens == 2928


@pytest.mark.parametrize("name", list(IMAGES))
def test_llava_pixel_values_match_transformers(name, hf_llava_image_processor):
    pixels = IMAGES[name]()
    expected = hf_llava_image_processor(Image.fromarray(pixels), return_tensors="np")
    processed = LlavaNextImageProcessor()(pixels)
    assert processed.pixel_values.dtype == np.uint8  # normalised on the device
    normalized = normalize_pixels(processed.pixel_values, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert _max_error(normalized, expected["pixel_values"][0]) <= TOL
    assert processed.image_size == tuple(expected["image_sizes"][0]) == pixels.shape[:2]


@pytest.mark.parametrize(
    ("height", "width", "tokens"),
    [
        (336, 336, 1176),
        (1344, 1344, 2928),
        (480, 640, 2340),
        (640, 480, 2352),
        (1000, 300, 2232),
        (50, 30, None),
    ],
)
def test_llava_token_count_matches_llava_next_processor(height, width, tokens, hf_llava_processor):
    """Counted in the input_ids the real processor produces (transformers' LlavaNextProcessor)."""
    image = _gradient_image(height, width)
    ids = hf_llava_processor(images=Image.fromarray(image), text="<image>", return_tensors="np")["input_ids"]
    expected = int((ids == 1).sum())
    processed = LlavaNextImageProcessor()(image)
    assert processed.num_tokens == expected
    if tokens is not None:
        assert processed.num_tokens == tokens


def test_llava_token_count_formula_over_many_sizes(hf_llava_processor):
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in size) for size in rng.integers(1, 2500, (300, 2))]
    sizes += [(336, 336), (672, 672), (337, 336), (336, 1008), (1, 1), (1, 2000), (2000, 1)]
    expected = hf_llava_processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    processor = LlavaNextImageProcessor()
    assert [processor.num_tokens(h, w) for h, w in sizes] == expected
    assert max(expected) <= processor.max_num_tokens


def test_llava_select_best_resolution_matches_transformers():
    from transformers.image_processing_utils import select_best_resolution as reference

    rng = np.random.default_rng(1)
    sizes = [tuple(int(v) for v in size) for size in rng.integers(1, 3000, (500, 2))] + [(336, 336), (10, 10)]
    pinpoints = [list(p) for p in LLAVA_V16_PINPOINTS]
    for size in sizes:
        assert select_best_resolution(size, LLAVA_V16_PINPOINTS) == tuple(reference(size, pinpoints)), size
    # Exact tie: the first listed pinpoint wins.
    assert select_best_resolution((336, 336), LLAVA_V16_PINPOINTS) == (336, 672)


def test_unpad_shape_matches_unpad_image():
    """Every pinpoint (not only the best), for random and edge-case sizes, against the torch code."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    rng = np.random.default_rng(2)
    sizes = [tuple(int(v) for v in size) for size in rng.integers(1, 3000, (200, 2))]
    sizes += [(336, 336), (480, 640), (640, 480), (1000, 300), (300, 1000), (7, 3), (3, 7), (1, 1)]
    seen = set()
    for size in sizes:
        for pinpoint in LLAVA_V16_PINPOINTS:
            features = torch.empty(1, pinpoint[0] // 336 * 24, pinpoint[1] // 336 * 24)
            expected = tuple(unpad_image(features, list(size)).shape[1:])
            assert unpad_shape(size, pinpoint) == expected, (size, pinpoint)
            seen.add(expected != features.shape[1:])
    assert seen == {True, False}  # both unpadded and untouched grids were exercised


def test_llava_letterbox_is_black_in_pixel_space():
    """A white 1200x360 image picks (1008, 336) and fits it as 1008x303 (ceil of 302.4): black bars
    of (336 - 303) // 2 = 16 columns on the left and 17 on the right, pixel value 0."""
    processed = LlavaNextImageProcessor()(np.full((1200, 360, 3), 255, np.uint8))
    assert processed.pixel_values.shape == (4, 3, 336, 336)  # base + 3 crops stacked vertically
    for crop in processed.pixel_values[1:]:
        assert (crop[:, :, :16] == 0).all()
        assert (crop[:, :, 16:319] == 255).all()
        assert (crop[:, :, 319:] == 0).all()
    assert (processed.pixel_values[0] == 255).all()  # base: squashed, no bars


# --------------------------------------------------------------------------------------------
# Phi-3.5-V
# --------------------------------------------------------------------------------------------


# (image, num_crops) run through the reference processor, and the sizes whose token counts it gives.
PHI3V_CASES = [(name, 4) for name in IMAGES] + [(name, 16) for name in ("chelsea_300x451", "tall_1001x217")]
TOKEN_NUM_CROPS = (1, 4, 9, 16)
TOKEN_SIZES = [tuple(int(v) for v in size) for size in np.random.default_rng(3).integers(20, 3000, (300, 2))]


@pytest.fixture(scope="module")
def reference_phi3v(tmp_path_factory) -> dict[str, np.ndarray]:
    """Everything the Phi-3.5-V tests need from the reference, from one run of
    tests/reference_phi3v_processor.py under ``UNIME_REFERENCE_PYTHON`` on PNG copies of the images."""
    directory = tmp_path_factory.mktemp("phi3v_reference")
    paths = {}
    for name, _ in PHI3V_CASES:
        if name not in paths:
            paths[name] = directory / f"{name}.png"
            Image.fromarray(IMAGES[name]()).save(paths[name])
    spec = {
        "cases": [{"image": str(paths[name]), "num_crops": num_crops} for name, num_crops in PHI3V_CASES],
        "token_sizes": {"num_crops": list(TOKEN_NUM_CROPS), "sizes": [list(size) for size in TOKEN_SIZES]},
    }
    return run_reference(spec, directory)


def test_phi3v_reference_runs_real_torchvision(reference_phi3v):
    torch_version, torchvision_version, transformers_version, torchvision_file = reference_phi3v["versions"]
    assert torchvision_version and torch_version
    assert Path(torchvision_file).parts[-2:] == ("torchvision", "__init__.py")
    assert transformers_version == transformers.__version__


def test_phi3v_defaults_and_static_shapes():
    processor = Phi3VImageProcessor()
    assert (processor.num_crops, processor.crop_size) == (4, 336)
    assert processor.max_crops == 5
    assert processor.max_num_tokens == 781  # a 4x1 grid
    # A 1:5 portrait reaches that 4x1 grid.
    tall = processor(_random_image(500, 100))
    assert tall.image_size == (1344, 336)
    assert tall.num_tokens == processor.max_num_tokens


@pytest.mark.parametrize(
    ("width", "height", "tokens_4", "tokens_16"),
    [
        (336, 336, 757, 2509),
        (672, 672, 757, 2509),
        (1344, 1344, 757, 2509),
        (640, 480, 757, 1921),
        (480, 640, 757, 1933),
        (1000, 300, 601, 1909),
    ],
)
def test_phi3v_token_counts_spec_table(width, height, tokens_4, tokens_16):
    """Phi-3.5-V's processor: an h x w crop grid gives 144(hw + 1) + 12(h + 1) + 1 tokens; sizes are W x H."""
    assert Phi3VImageProcessor(num_crops=4).num_tokens(height, width) == tokens_4
    assert Phi3VImageProcessor(num_crops=16).num_tokens(height, width) == tokens_16


def test_phi3v_token_counts_match_reference_over_many_sizes(reference_phi3v):
    expected_tokens = reference_phi3v["size_tokens"]
    assert expected_tokens.shape == (len(TOKEN_NUM_CROPS), len(TOKEN_SIZES))
    for num_crops, expected_row in zip(TOKEN_NUM_CROPS, expected_tokens, strict=True):
        processor = Phi3VImageProcessor(num_crops=num_crops)
        for (height, width), expected in zip(TOKEN_SIZES, expected_row, strict=True):
            assert processor.num_tokens(height, width) == expected, (num_crops, height, width)
            assert expected <= processor.max_num_tokens


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((3, 672, 672), (336, 336)),  # the real use: integer downscale factors
        ((3, 1008, 1344), (336, 336)),
        ((3, 336, 1344), (336, 336)),
        ((2, 3, 50, 30), (336, 336)),  # strong upscale, non-integer factors
        ((1, 3, 400, 333), (336, 336)),
        ((3, 5, 7), (11, 3)),
        ((3, 1, 1), (4, 4)),
        ((3, 17, 17), (17, 17)),
    ],
)
def test_bicubic_matches_torch_interpolate(shape, size):
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    batched = torch.from_numpy(x.reshape(-1, *shape[-3:]))
    expected = torch.nn.functional.interpolate(batched, size=size, mode="bicubic", align_corners=False)
    actual = resize_bicubic_like_torch(x, *size)
    assert actual.dtype == np.float32
    assert _max_error(actual, expected.numpy().reshape(*shape[:-2], *size)) <= TOL


def test_bicubic_is_not_jax_image_resize():
    """Why the port exists: jax's cubic (Keys A=-0.5, antialiased) is a different resampler."""
    import jax

    x = np.random.default_rng(5).standard_normal((3, 672, 672)).astype(np.float32)
    jax_resized = np.asarray(jax.image.resize(x, (3, 336, 336), method="cubic"))
    assert _max_error(resize_bicubic_like_torch(x, 336, 336), jax_resized) > 1e-2


@pytest.mark.parametrize(
    ("index", "name", "num_crops"),
    [(index, name, num_crops) for index, (name, num_crops) in enumerate(PHI3V_CASES)],
    ids=[f"{name}-{num_crops}" for name, num_crops in PHI3V_CASES],
)
def test_phi3v_matches_reference_processor(index, name, num_crops, reference_phi3v):
    pixels = IMAGES[name]()
    expected = reference_phi3v[f"pixel_values_{index}"]
    processed = Phi3VImageProcessor(num_crops=num_crops)(pixels)
    assert processed.pixel_values.dtype == np.float32
    assert processed.pixel_values.shape == expected.shape == (num_crops + 1, 3, 336, 336)
    assert _max_error(processed.pixel_values[1:], expected[1:]) <= TOL  # HD crops and zero padding
    assert _max_error(processed.pixel_values[0], expected[0]) <= TOL  # bicubic global view
    assert processed.image_size == tuple(int(v) for v in reference_phi3v[f"image_sizes_{index}"])
    assert processed.num_tokens == int(reference_phi3v[f"num_img_tokens_{index}"])


@pytest.mark.parametrize(
    ("width", "height", "resized", "padded", "top"),
    [
        # W x H; (h, w) after the bilinear resize; (h, w) after padding; rows of white on top.
        (640, 480, (504, 672), (672, 672), 84),
        (600, 401, (449, 672), (672, 672), 111),  # odd padding: 111 above, 112 below
        (1000, 300, (302, 1008), (336, 1008), 17),
        (336, 336, (672, 672), (672, 672), 0),
    ],
)
def test_phi3v_hd_transform_resize_and_white_padding(width, height, resized, padded, top):
    """Sizes worked out by hand from the Phi-3.5-V processor's HD-transform rules."""
    image = Image.fromarray(_gradient_image(height, width))
    hd = hd_transform(image, num_crops=4, crop_size=336)
    assert hd.shape == (*padded, 3) and hd.dtype == np.uint8
    expected = np.asarray(image.resize(resized[::-1], Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(hd[top : top + resized[0]], expected)
    assert (hd[:top] == 255).all() and (hd[top + resized[0] :] == 255).all()


def test_phi3v_portrait_is_resized_transposed():
    """A portrait is resized as its transpose (PIL's two passes round differently) and padded at the sides."""
    image = Image.fromarray(_gradient_image(600, 401))
    hd = hd_transform(image, num_crops=4, crop_size=336)
    assert hd.shape == (672, 672, 3)
    transposed = image.transpose(Image.Transpose.TRANSPOSE).resize((672, 449), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(hd[:, 111:560], np.asarray(transposed).transpose(1, 0, 2))
    assert (hd[:, :111] == 255).all() and (hd[:, 560:] == 255).all()
    direct = np.asarray(image.resize((449, 672), Image.Resampling.BILINEAR))
    assert not np.array_equal(hd[:, 111:560], direct)  # the transposition is observable


def test_phi3v_crops_are_row_major_after_the_global_view():
    """A 1008x672 image with num_crops=6 is a 2x3 grid with no resize: paint each crop a distinct colour."""
    colours = np.array([[[20 * (3 * r + c) + 10, 200 - 15 * r, 30 * c] for c in range(3)] for r in range(2)])
    pixels = np.repeat(np.repeat(colours, 336, axis=0), 336, axis=1).astype(np.uint8)
    processed = Phi3VImageProcessor(num_crops=6)(pixels)
    assert processed.pixel_values.shape == (7, 3, 336, 336)
    assert processed.image_size == (672, 1008)
    mean, std = np.asarray(OPENAI_CLIP_MEAN), np.asarray(OPENAI_CLIP_STD)
    for index in range(6):
        expected = (colours[divmod(index, 3)] / 255 - mean) / std
        assert np.allclose(processed.pixel_values[1 + index], expected[:, None, None], atol=1e-6), index
    # The global view is torch's bicubic of the normalised HD image.
    hd = torch.from_numpy(processed.pixel_values[1:].reshape(2, 3, 3, 336, 336).transpose(2, 0, 3, 1, 4))
    expected_global = torch.nn.functional.interpolate(
        hd.reshape(1, 3, 672, 1008), size=(336, 336), mode="bicubic", align_corners=False
    )
    assert _max_error(processed.pixel_values[0], expected_global[0].numpy()) <= TOL


def test_phi3v_unused_crops_are_zero():
    processed = Phi3VImageProcessor(num_crops=4)(_gradient_image(300, 1000))  # 1x3 grid
    assert processed.image_size == (336, 1008)
    assert processed.num_tokens == 601
    assert np.abs(processed.pixel_values[:4]).sum(axis=(1, 2, 3)).min() > 0
    assert not processed.pixel_values[4].any()


# --------------------------------------------------------------------------------------------
# Inputs and batching
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_any_pil_mode_is_converted_like_the_references(mode):
    image = Image.fromarray(skimage_data.chelsea()).convert(mode)
    rgb = np.asarray(image.convert("RGB"))
    for processor in (Phi3VImageProcessor(), LlavaNextImageProcessor()):
        np.testing.assert_array_equal(processor(image).pixel_values, processor(rgb).pixel_values)


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        to_rgb(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        to_rgb(np.zeros((4, 4), np.uint8))
    with pytest.raises(TypeError):
        to_rgb([[0, 0, 0]])
    with pytest.raises(ValueError, match="num_crops"):
        Phi3VImageProcessor(num_crops=0)
    with pytest.raises(ValueError, match="multiples"):
        LlavaNextImageProcessor(image_grid_pinpoints=((336, 700),))

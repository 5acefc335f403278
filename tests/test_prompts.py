"""Prompt strings, token-id layouts against the reference processors, and the backbone featurizers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import transformers
from helpers.reference import reference_phi3v_ids
from helpers.tiny_configs import PINPOINTS, TILE, llava_config, phi3_v_config
from helpers.tokenizers import IMAGE_TOKEN, llava_tokenizer, mistral_tokenizer, phi_tokenizer
from PIL import Image

from unime_jax.backbones import llava_next, phi3_v, spec_for
from unime_jax.backbones.llava_next.images import LlavaNextImageProcessor
from unime_jax.backbones.llava_next.inputs import llava_next_ids
from unime_jax.backbones.phi3_v.inputs import phi3_v_ids
from unime_jax.models.decoder import DecoderConfig
from unime_jax.processing.featurizer import NUM_TILES
from unime_jax.processing.prompts import PromptFormat, bucket_length, length_buckets
from unime_jax.processing.text import TRUNCATED

TEMPLATES = {"phi3_v": phi3_v.TEMPLATES, "llava_next": llava_next.TEMPLATES}


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# ------------------------------------------------------------------------------------------------
# Prompt strings
# ------------------------------------------------------------------------------------------------


def test_template_strings_are_unimes():
    phi, llava = PromptFormat(TEMPLATES["phi3_v"]), PromptFormat(TEMPLATES["llava_next"])
    assert (
        phi.text_prompt("A dog runs.")
        == "<|user|>\nA dog runs.\nSummary above sentence in one word:<|end|>\n<|assistant|>\n"
    )
    assert (
        phi.image_prompt(None)
        == "<|user|>\n<|image_1|>\nSummary above image in one word:<|end|>\n<|assistant|>\n"
    )
    assert (
        llava.text_prompt("A dog runs.") == "[INST] A dog runs.\nSummary above sentence in one word: [/INST]"
    )
    assert llava.image_prompt(None) == "[INST] <image>\nSummary above image in one word: [/INST]"
    assert (
        llava.text_prompt("{text} stays")
        == "[INST] {text} stays\nSummary above sentence in one word: [/INST]"
    )
    with pytest.raises(ValueError, match="not both"):
        llava.image_prompt("a question")


VQA = "<|image_1|>\nRepresent the given image with the following question: {text}\n"


@pytest.mark.parametrize(
    ("style", "instruction", "text", "image", "expected"),
    [
        (
            "phi3_v",
            VQA,
            "What is it?",
            True,
            "<|image_1|>\nRepresent the given image with the following question: What is it?\n",
        ),
        (
            "llava_next",
            VQA,
            "What is it?",
            True,
            "<image>\nRepresent the given image with the following question: What is it?\n",
        ),
        # no placeholder: prepended for image rows, absent from text-only rows
        (
            "llava_next",
            "Find a caption for the news in the given photo.",
            None,
            True,
            "<image>\nFind a caption for the news in the given photo.",
        ),
        (
            "phi3_v",
            "Retrieve an image of this news caption.",
            "Storm hits.",
            False,
            "Retrieve an image of this news caption. Storm hits.",
        ),
        (
            "phi3_v",
            "Find me an everyday image that matches the given caption: {text}",
            "A cat.",
            False,
            "Find me an everyday image that matches the given caption: A cat.",
        ),
        # a placeholder in a row without an image stays text (MMEB's WebQA queries)
        (
            "llava_next",
            "<|image_1|> Find a Wikipedia image that answers this question: {text}",
            "Who?",
            False,
            "<image> Find a Wikipedia image that answers this question: Who?",
        ),
    ],
)
def test_instructions(style, instruction, text, image, expected):
    prompt = PromptFormat(TEMPLATES[style], instruction=instruction)
    assert (prompt.image_prompt(text) if image else prompt.text_prompt(text)) == expected


def test_raw_prompts():
    phi, llava = PromptFormat(TEMPLATES["phi3_v"], raw=True), PromptFormat(TEMPLATES["llava_next"], raw=True)
    assert phi.text_prompt("exactly  this\n") == "exactly  this\n"
    assert (
        llava.image_prompt("<|image_1|>\nRepresent the given image.") == "<image>\nRepresent the given image."
    )
    assert phi.image_prompt("a caption") == "<|image_1|>\na caption"
    assert phi.image_prompt(None) == "<|image_1|>"
    with pytest.raises(ValueError, match="once per image"):
        llava.image_prompt("<image> and <|image_1|>")
    with pytest.raises(ValueError, match="cannot be combined"):
        PromptFormat(TEMPLATES["phi3_v"], raw=True, instruction="x")


def test_length_buckets():
    assert length_buckets(200) == (32, 48, 64, 96, 128, 192, 200)
    assert length_buckets(32) == (32,)
    assert bucket_length(97, length_buckets(3184)) == 128
    assert bucket_length(1300, length_buckets(3184)) == 1536
    with pytest.raises(ValueError, match="do not fit"):
        bucket_length(201, length_buckets(200))


# ------------------------------------------------------------------------------------------------
# Token ids against the reference processors
# ------------------------------------------------------------------------------------------------


PHI3V_ID_CASES = [
    ("<|user|>\n<|image_1|>\nSummary above image in one word:<|end|>\n<|assistant|>\n", [757]),
    ("<|image_1|>\nRepresent the given image with the following question: What is it?\n", [601]),
    ("<|image_1|>", [29]),  # empty chunks: BOS, image, BOS
    ("Compare <|image_1|> with <|image_2|> and <|image_1|> again.", [5, 7]),
    ("<|user|>\nA dog runs.\nSummary above sentence in one word:<|end|>\n<|assistant|>\n", []),
    ("<|image_1|> Find a Wikipedia image: who?", []),  # no image: the tag is text
]


@pytest.fixture(scope="module")
def phi3v_reference_ids(tmp_path_factory) -> list[list[int]]:
    return reference_phi3v_ids(PHI3V_ID_CASES, tmp_path_factory.mktemp("phi3v_ids"))


@pytest.mark.parametrize("index", range(len(PHI3V_ID_CASES)))
def test_phi3_v_ids_match_the_reference_processor(phi3v_reference_ids, index):
    prompt, num_tokens = PHI3V_ID_CASES[index]
    assert phi3_v_ids(phi_tokenizer(), prompt, num_tokens) == phi3v_reference_ids[index]


def test_phi3_v_id_layout():
    """BOS opens every chunk, also right after the image; the image is -1 repeated; mask covers it."""
    tokenizer = phi_tokenizer()
    bos = tokenizer.bos_token_id
    prompt = PromptFormat(TEMPLATES["phi3_v"]).image_prompt(None)
    ids = phi3_v_ids(tokenizer, prompt, [29])
    first = ids.index(-1)
    assert ids[0] == bos and ids[first - 1] != bos  # "<|user|>\n" before the image
    assert ids[first : first + 29] == [-1] * 29 and ids.count(-1) == 29
    assert ids[first + 29] == bos  # the chunk after the image starts with its own BOS
    assert ids.count(bos) == 2 and ids[-1] != tokenizer.eos_token_id
    assert phi3_v_ids(tokenizer, "<|image_1|>", [3]) == [bos, -1, -1, -1, bos]
    with pytest.raises(ValueError, match="do not number"):
        phi3_v_ids(tokenizer, "<|image_2|>", [3])


@pytest.fixture(scope="module")
def llava_processor():
    """transformers' LlavaNextProcessor at the tiny geometry, with llava-hf's processor settings."""
    image_processor = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=[list(p) for p in PINPOINTS],
    )
    return transformers.LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=llava_tokenizer(),
        patch_size=7,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


@pytest.mark.parametrize("size", [(28, 28), (30, 40), (90, 20), (61, 57), (13, 100)])
@pytest.mark.parametrize(
    "prompt",
    [
        "[INST] <image>\nSummary above image in one word: [/INST]",
        "<image>\nRepresent the given image with the following question: What is it?\n",
        "<image>",
    ],
)
def test_llava_next_ids_match_llava_next_processor(llava_processor, prompt, size):
    expected = llava_processor(text=prompt, images=_image(*size), return_tensors="np")["input_ids"][
        0
    ].tolist()
    ours = LlavaNextImageProcessor(PINPOINTS, crop_size=TILE, patch_size=7)
    ids = llava_next_ids(llava_processor.tokenizer, prompt, IMAGE_TOKEN, ours.num_tokens(*size))
    assert ids == expected
    assert (
        ids[0] == llava_processor.tokenizer.bos_token_id
        and ids.count(llava_processor.tokenizer.bos_token_id) == 1
    )


def test_llava_next_text_ids_and_grid(llava_processor):
    prompt = "[INST] A dog runs.\nSummary above sentence in one word: [/INST]"
    expected = llava_processor(text=prompt, return_tensors="np")["input_ids"][0].tolist()
    assert llava_next_ids(llava_processor.tokenizer, prompt, IMAGE_TOKEN, None) == expected
    with pytest.raises(ValueError, match="expected one image token"):
        llava_next_ids(llava_processor.tokenizer, prompt, IMAGE_TOKEN, 5)
    # The processor exposes the pinpoint grid it chose, as HF's select_best_resolution picks it.
    processor = LlavaNextImageProcessor(PINPOINTS, crop_size=TILE, patch_size=7)
    for size, grid in [((28, 28), (1, 2)), ((30, 40), (2, 2)), ((90, 20), (3, 1)), ((20, 90), (1, 3))]:
        assert processor(np.asarray(_image(*size))).image_grid == processor.image_grid(*size) == grid


# ------------------------------------------------------------------------------------------------
# Featurizers
# ------------------------------------------------------------------------------------------------

LLAVA_KEYS = {"input_ids", "attention_mask", "pixel_values", "image_sizes", "image_grids", NUM_TILES, TRUNCATED}


def _shapes(out: dict[str, np.ndarray]) -> dict[str, tuple]:
    return {k: (v.shape, v.dtype) for k, v in out.items()}


def test_llava_featurizer_has_fixed_shapes():
    cfg = llava_config()
    featurizer = spec_for("llava_next").featurizer(cfg, llava_tokenizer(), max_len=24)
    assert featurizer.seq_len == 24 + cfg.max_image_tokens == 24 + 88
    text = featurizer("A dog runs.")
    image_only = spec_for("llava_next").featurizer(cfg, llava_tokenizer(), max_len=24, raw=True)(
        "<|image_1|>\nRepresent the given image.", _image(30, 40)
    )
    assert set(text) == set(image_only) == LLAVA_KEYS
    assert _shapes(text) == _shapes(image_only)
    assert image_only["pixel_values"].shape == (5, 3, TILE, TILE)
    assert text["input_ids"].shape == (112,) and text["input_ids"].dtype == np.int32
    assert not text["pixel_values"].any() and not text["image_sizes"].any() and not text["image_grids"].any()
    np.testing.assert_array_equal(image_only["image_sizes"], [30, 40])
    np.testing.assert_array_equal(image_only["image_grids"], [2, 2])
    assert (text[NUM_TILES], image_only[NUM_TILES]) == (0, 5)  # the base tile and the 2×2 grid
    n = int(image_only["attention_mask"].sum())
    assert (image_only["input_ids"][:n] == IMAGE_TOKEN).sum() == LlavaNextImageProcessor(
        PINPOINTS, crop_size=TILE, patch_size=7
    ).num_tokens(30, 40)


def test_phi3_v_featurizer_has_fixed_shapes():
    cfg = phi3_v_config()
    featurizer = spec_for("phi3_v").featurizer(cfg, phi_tokenizer(), max_len=32)
    text = featurizer("A dog runs.")
    image = featurizer("", _image(50, 23))  # image only: the image template
    assert (
        set(text)
        == set(image)
        == {"input_ids", "attention_mask", "pixel_values", "image_sizes", NUM_TILES, TRUNCATED}
    )
    assert _shapes(text) == _shapes(image)
    assert image["pixel_values"].shape == (cfg.max_crops, 3, TILE, TILE)
    assert featurizer.seq_len == 32 + cfg.max_image_tokens
    h, w = (int(x) // TILE for x in image["image_sizes"])
    assert (image["input_ids"] == -1).sum() == cfg.num_image_tokens(h, w)
    assert (text[NUM_TILES], image[NUM_TILES]) == (0, 1 + h * w)  # the global view and the crops
    assert image["attention_mask"].sum() > (image["input_ids"] == -1).sum()
    assert not text["pixel_values"].any() and not text["image_sizes"].any()


def test_text_truncation_keeps_the_template_and_images_are_never_cut():
    tokenizer = llava_tokenizer()
    featurizer = spec_for("mistral").featurizer(
        DecoderConfig("mistral", 32064, 8, 8, 1, 1, 1, 8), tokenizer, max_len=24
    )
    out = featurizer("A man is playing a guitar on a small stage in the park. " * 4)
    assert set(out) == {"input_ids", "attention_mask", NUM_TILES, TRUNCATED} and out["input_ids"].shape == (24,)
    assert out[TRUNCATED] and out["attention_mask"].sum() <= 24
    assert tokenizer.decode(out["input_ids"][: out["attention_mask"].sum()]).endswith(
        "\nSummary above sentence in one word: [/INST]"
    )
    with pytest.raises(ValueError, match="takes no images"):
        featurizer("x", _image(8, 8))
    vqa = spec_for("llava_next").featurizer(
        llava_config(),
        tokenizer,
        max_len=20,
        instruction=VQA,
    )
    with pytest.raises(ValueError, match="not truncated: raise max_len"):
        vqa("a very long question " * 20, _image(61, 57))


def test_featurizer_pickles_and_checks_the_image_token():
    featurizer = spec_for("llava_next").featurizer(llava_config(), llava_tokenizer(), max_len=24)
    again = pickle.loads(pickle.dumps(featurizer))  # grain workers get a copy
    image = _image(30, 40)
    expected, got = featurizer("", image), again("", image)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value)
    with pytest.raises(ValueError, match="image_token_index=32000"):
        spec_for("llava_next").featurizer(llava_config(), mistral_tokenizer(), max_len=24)


def test_collate_pads_to_a_bucket_and_drops_images_for_text_batches():
    featurizer = spec_for("llava_next").featurizer(llava_config(), llava_tokenizer(), max_len=24)
    ids = [featurizer.token_ids("A cat.")[0], featurizer.token_ids("A dog runs fast.")[0]]
    text_batch = featurizer.collate(ids, [None, None])
    assert set(text_batch) == {"input_ids", "attention_mask"} and text_batch["input_ids"].shape == (2, 32)
    arrays, tokens = featurizer.process_image(_image(28, 28))
    ids.append(featurizer.token_ids(None, tokens)[0])
    mixed = featurizer.collate(ids, [None, None, arrays])
    assert mixed["input_ids"].shape == (3, 64) and mixed["pixel_values"].shape == (3, 3, 3, TILE, TILE)  # its 3 real tiles
    np.testing.assert_array_equal(mixed["image_grids"], [[0, 0], [0, 0], [1, 2]])
    np.testing.assert_array_equal(mixed["attention_mask"].sum(1), [len(i) for i in ids])

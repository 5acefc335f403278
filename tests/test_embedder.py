"""`UniME` on a tiny LLaVA-NeXT with the real Mistral tokenizer: parity with transformers (fp32, <= 1e-4),
HF directory vs converted checkpoint, input order, compilation reuse, input errors."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from helpers.llava import SIZES, TOL, Reference, random_image, write_tiny_llava

# reference_clip is a fixture, imported to be used here.
from helpers.phi3_v_reference import reference_clip, write_reference  # noqa: F401
from helpers.reference import reference_phi3v_ids
from helpers.tokenizers import llava_tokenizer, phi_tokenizer

from unime_jax import UniME
from unime_jax.backbones.phi3_v.images import Phi3VImageProcessor
from unime_jax.conversion import convert_hf_dir
from unime_jax.embedder import InputError
from unime_jax.sharding import make_mesh

TEXT = "[INST] {}\nSummary above sentence in one word: [/INST]"
IMAGE = "[INST] <image>\nSummary above image in one word: [/INST]"
VQA = "<|image_1|>\nRepresent the given image with the following question: {text}\n"

TEXTS = [
    "A dog runs along the beach at sunset, chasing a ball.",
    "A red car.",
    "Two people sit on a bench in a park while pigeons gather around their feet.",
    "Snow.",
]
QUESTIONS = ["What animal is this?", "Is it raining?", "How many people are there in the picture?"]


@pytest.fixture(autouse=True, scope="module")
def _no_compilation_cache():
    with pytest.MonkeyPatch.context() as patch:  # tests never write to the user's cache
        patch.setenv("UNIME_JAX_COMPILATION_CACHE", "0")
        yield


def max_error(ours: np.ndarray, expected: list[np.ndarray]) -> float:
    assert ours.shape == (len(expected), expected[0].shape[0]) and ours.dtype == np.float32
    return float(np.abs(ours - np.stack(expected)).max())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return write_tiny_llava(tmp_path_factory.mktemp("unime") / "hf")


@pytest.fixture(scope="module")
def reference(hf_dir) -> Reference:
    return Reference(hf_dir)


@pytest.fixture(scope="module")
def mesh():
    # Two of conftest's fake CPU devices: batches really are split, without running 8 copies on 2 cores.
    return make_mesh(devices=jax.devices()[:2])


@pytest.fixture(scope="module")
def unime(hf_dir, mesh) -> UniME:
    return UniME.load(hf_dir, mesh=mesh, progress=False)


def test_text_embeddings_match_transformers(unime, reference):
    expected = [reference.embed(TEXT.format(t)) for t in TEXTS]
    ours = unime.encode(texts=TEXTS, batch_size=4)
    assert max_error(ours, expected) <= TOL
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_image_embeddings_match_transformers(unime, reference):
    images = [random_image(size, seed) for seed, size in enumerate(SIZES)]
    expected = [reference.embed(IMAGE, image) for image in images]
    # Mixed input types: PIL, numpy; a batch of 2 splits them over two forward passes.
    sources = [images[0], np.asarray(images[1]), images[2], np.asarray(images[3])]
    assert max_error(unime.encode(images=sources, batch_size=2), expected) <= TOL


def test_image_text_pairs_with_an_instruction_match_transformers(unime, reference, tmp_path):
    images = [random_image(size, seed + 10) for seed, size in enumerate(SIZES[:3])]
    paths = []
    for i, image in enumerate(images):  # file paths, as the CLI passes them
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    prompt = "<image>\nRepresent the given image with the following question: {}\n"
    expected = [reference.embed(prompt.format(q), image) for q, image in zip(QUESTIONS, images, strict=True)]
    assert max_error(unime.encode(QUESTIONS, paths, instruction=VQA), expected) <= TOL


def test_mixed_rows_keep_their_order(unime, reference):
    """Text-only and image rows of different lengths are regrouped and sorted internally."""
    rows = [
        (TEXTS[2], None),
        (None, random_image(SIZES[0], 20)),
        (TEXTS[1], None),
        (None, random_image(SIZES[2], 21)),
        (TEXTS[0], None),
    ]
    expected = [reference.embed(TEXT.format(t) if img is None else IMAGE, img) for t, img in rows]
    ours = unime.encode([t for t, _ in rows], [img for _, img in rows], batch_size=2)
    assert max_error(ours, expected) <= TOL


def test_hf_directory_and_converted_checkpoint_agree(hf_dir, unime, mesh, tmp_path):
    convert_hf_dir(hf_dir, tmp_path / "ckpt", progress=False)
    converted = UniME.load(tmp_path / "ckpt", mesh=mesh)
    assert converted.model_type == "llava_next" and converted.dim == 32
    texts = [TEXTS[0], None]
    images = [None, random_image(SIZES[1], 30)]
    np.testing.assert_array_equal(converted.encode(texts, images), unime.encode(texts, images))


def test_one_compilation_serves_calls_in_the_same_bucket(hf_dir, mesh):
    model = UniME.load(hf_dir, mesh=mesh, progress=False)
    first = model.encode(texts=["A cat.", "A dog."])
    second = model.encode(texts=["A small bird sings.", "Rain."])
    assert model._forward._cache_size() == 1
    assert first.shape == second.shape == (2, 32)


def test_rows_pad_to_the_devices_and_batches_split_over_them(unime, reference):
    """Three rows on two devices: padded to four, the extra row dropped."""
    ours = unime.encode(texts=TEXTS[:3], batch_size=3)
    assert ours.shape == (3, 32)
    assert max_error(ours, [reference.embed(TEXT.format(t)) for t in TEXTS[:3]]) <= TOL


def test_input_errors_name_the_input(unime, tmp_path):
    with pytest.raises(InputError, match=r"input 1: an input needs a text or an image"):
        unime.encode(texts=["ok", ""])
    with pytest.raises(InputError, match=r"input 0: cannot read image .*missing\.png"):
        unime.encode(images=[tmp_path / "missing.png"])
    with pytest.raises(InputError, match=r"input 1: expected an \(H, W, 3\) uint8 image array"):
        unime.encode(images=[np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)])
    with pytest.raises(ValueError, match="not both"):
        unime.encode(texts=["a question"], images=[random_image((28, 28), 0)])
    with pytest.raises(ValueError, match="paired row by row"):
        unime.encode(texts=["a", "b"], images=[random_image((28, 28), 0)])


def test_text_only_decoder_matches_transformers(tmp_path, mesh, caplog):
    """A bare Mistral LM (a stage-1 student) gets LLaVA's text template; long texts are shortened."""
    torch.manual_seed(2)
    cfg = transformers.MistralConfig(
        vocab_size=32064,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    ref = transformers.MistralForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer = llava_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    model = UniME.load(tmp_path, mesh=mesh, max_len=24, progress=False)
    texts = [TEXTS[1], TEXTS[2] * 3]  # the second is cut to 24 tokens, template kept
    with caplog.at_level("WARNING"):
        ours = model.encode(texts=texts)
    assert "1 of 2 texts were longer than max_len=24" in caplog.text
    expected = []
    for text in texts:
        ids = model.featurizer().token_ids(text)[0]
        assert len(ids) <= 24 and tokenizer.decode(ids).endswith(
            "Summary above sentence in one word: [/INST]"
        )
        with torch.no_grad():
            hidden = ref(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        expected.append(torch.nn.functional.normalize(hidden, dim=-1).numpy())
    assert tokenizer.decode(model.featurizer().token_ids(texts[0])[0]) == "<s>" + TEXT.format(texts[0])
    assert max_error(ours, expected) <= TOL


# ------------------------------------------------------------------------------------------------
# Phi-3.5-V against the VLM2Vec reference (CLIP-L geometry, shallow; see tests/test_phi3_v.py)
# ------------------------------------------------------------------------------------------------

PHI_TEXT = "<|user|>\n{}\nSummary above sentence in one word:<|end|>\n<|assistant|>\n"
PHI_IMAGE = "<|user|>\n<|image_1|>\nSummary above image in one word:<|end|>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def phi3_v(tmp_path_factory, reference_clip):  # noqa: F811
    """(HF directory with the Phi tokenizer, VLM2Vec reference model)."""
    out = tmp_path_factory.mktemp("unime_phi3_v") / "hf"
    ref = write_reference(out, vocab_size=32064)  # room for the Mistral sentencepiece plus Phi's chat tokens
    phi_tokenizer().save_pretrained(out)
    return out, ref


def test_phi3_v_embeddings_match_the_reference(phi3_v, tmp_path):
    """Our featurizer and model vs the reference processor's ids and VLM2Vec's model, on our crops
    (the crops themselves are checked against VLM2Vec's image processor in tests/test_images.py)."""
    path, ref = phi3_v
    model = UniME.load(path, mesh=make_mesh(devices=jax.devices()[:1]), progress=False)
    processor = Phi3VImageProcessor(num_crops=4)
    images = [random_image((60, 60), 50), random_image((30, 100), 51)]
    rows = [(PHI_TEXT.format(TEXTS[0]), None), (PHI_IMAGE, images[0]), (PHI_IMAGE, images[1])]
    processed = [None if image is None else processor(image) for _, image in rows]
    cases = [
        (prompt, [] if p is None else [p.num_tokens]) for (prompt, _), p in zip(rows, processed, strict=True)
    ]
    reference_ids = reference_phi3v_ids(cases, tmp_path)
    expected = []
    for p, ids_list in zip(processed, reference_ids, strict=True):
        pixels, sizes = [None], [None]
        if p is not None:
            pixels = [torch.tensor(p.pixel_values[None])]
            sizes = [torch.tensor([p.image_size])]
        ids = torch.tensor([ids_list])
        with torch.no_grad():
            out = ref(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=pixels,
                image_sizes=sizes,
                output_hidden_states=True,
                use_cache=False,
            )
        expected.append(torch.nn.functional.normalize(out.hidden_states[-1][0, -1], dim=-1).numpy())
    ours = model.encode([TEXTS[0], None, None], [None, *images])
    print(
        "phi3v", max_error(ours, expected), np.abs(ours[1] - ours[2]).max(), np.abs(ours[0] - ours[1]).max()
    )
    assert max_error(ours, expected) <= TOL

"""`python -m unime_jax.encode --raw` and `UniME.encode` on a converted tiny LLaVA-OneVision equal
transformers' last-token final-norm embeddings (text-only rows and images at three sizes, one of
them downscaled by anyres_max)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.onevision import TOL, Reference, random_image, write_tiny_onevision
from PIL import Image

from unime_jax import UniME
from unime_jax.backbones.llava_onevision import TEMPLATES
from unime_jax.conversion import convert_hf_dir
from unime_jax.encode import main

SIZES = [(30, 30), (61, 57), (30, 40)]  # 1×1 grid; 2×2 downscaled; 1×2 cut


@pytest.fixture(autouse=True, scope="module")
def _no_compilation_cache():
    with pytest.MonkeyPatch.context() as patch:  # tests never write to the user's cache
        patch.setenv("UNIME_JAX_COMPILATION_CACHE", "0")
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Reference, Path]:
    """(converted checkpoint, transformers reference of the same weights, folder of images)."""
    base = tmp_path_factory.mktemp("onevision_encode")
    hf = write_tiny_onevision(base / "hf", seed=3)
    convert_hf_dir(hf, base / "ckpt", progress=False)
    (base / "images").mkdir()
    for i, size in enumerate(SIZES):
        random_image(size, 60 + i).save(base / "images" / f"{i}.png")
    return base / "ckpt", Reference(hf), base


# (JSONL row, the prompt transformers gets, image index)
RAW_ROWS = [
    ({"text": "A dog runs along the beach.", "image": None}, "A dog runs along the beach.", None),
    (
        {"text": "<|image_1|>\nRepresent the given image.", "image": "images/0.png"},
        "<image>\nRepresent the given image.",
        0,
    ),
    ({"text": None, "image": "images/1.png"}, "<image>", 1),
    ({"text": "Rain.", "image": None}, "Rain.", None),
    ({"text": "What is it?", "image": "images/2.png"}, "<image>\nWhat is it?", 2),
]


def _image(base: Path, index: int | None) -> Image.Image | None:
    return None if index is None else Image.open(base / "images" / f"{index}.png")


def test_raw_encode_matches_transformers(model, tmp_path, capsys):
    ckpt, reference, base = model
    source = base / "inputs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row, _, _ in RAW_ROWS))
    out = tmp_path / "emb.npy"
    argv = ["--model", str(ckpt), "--input", str(source), "--out", str(out), "--raw", "--batch-size", "2"]
    assert main([*argv, "--no-progress"]) == 0
    got = np.load(out)
    expected = np.stack([reference.embed(prompt, _image(base, i)) for _, prompt, i in RAW_ROWS])
    assert got.shape == (len(RAW_ROWS), 64)
    assert float(np.abs(got - expected).max()) <= TOL
    assert "wrote 5x64 embeddings" in capsys.readouterr().err


def test_unime_templates_match_transformers_on_the_chat_prompts(model):
    """The default prompts are Qwen2's chat rendering of E5-V's; the embeddings are transformers'."""
    ckpt, reference, base = model
    unime = UniME.load(ckpt, progress=False)
    texts = unime.encode(texts=["A red circle above a blue square.", "Rain."])
    expected = [
        reference.embed(TEMPLATES.text.replace("{text}", t))
        for t in ("A red circle above a blue square.", "Rain.")
    ]
    assert float(np.abs(texts - np.stack(expected)).max()) <= TOL
    images = unime.encode(images=[str(base / "images" / f"{i}.png") for i in range(len(SIZES))])
    expected = [reference.embed(TEMPLATES.image, _image(base, i)) for i in range(len(SIZES))]
    assert float(np.abs(images - np.stack(expected)).max()) <= TOL

"""`python -m unime_jax.encode` on a tiny converted LLaVA-NeXT: parity with transformers, order, bad lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.llava import SIZES, TOL, Reference, random_image, write_tiny_llava

from unime_jax.conversion import convert_hf_dir
from unime_jax.encode import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Reference]:
    """(converted checkpoint, transformers reference of the same weights)."""
    base = tmp_path_factory.mktemp("encode_cli")
    hf = write_tiny_llava(base / "hf", seed=1)
    convert_hf_dir(hf, base / "ckpt", progress=False)
    return base / "ckpt", Reference(hf)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """images/0.png .. 3.png (SIZES), a corrupt JPEG; paths in the JSONL are relative to this folder."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "images").mkdir()
    for i, size in enumerate(SIZES):
        random_image(size, 40 + i).save(root / "images" / f"{i}.png")
    (root / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG at all")
    return root


def _write(root: Path, lines: list[object]) -> Path:
    path = root / "inputs.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def _run(ckpt: Path, source: Path, out: Path, *extra: str) -> int:
    return main(["--model", str(ckpt), "--input", str(source), "--out", str(out), "--no-progress", *extra])


# Raw rows (MMEB style) and what transformers' processor gets for them.
RAW_ROWS = [
    ({"text": "A dog runs along the beach.", "image": None}, "A dog runs along the beach.", None),
    (
        {"text": "<|image_1|>\nRepresent the given image.", "image": "images/0.png"},
        "<image>\nRepresent the given image.",
        0,
    ),
    ({"text": None, "image": "images/2.png"}, "<image>", 2),
    ({"text": "Rain.", "image": None}, "Rain.", None),
    ({"text": "What is it?", "image": "images/3.png"}, "<image>\nWhat is it?", 3),
    ({"image": "images/1.png"}, "<image>", 1),
]


def _expected(reference: Reference, images: Path, rows=RAW_ROWS) -> np.ndarray:
    out = []
    for _, prompt, image in rows:
        pil = None
        if image is not None:
            from PIL import Image

            pil = Image.open(images / "images" / f"{image}.png")
        out.append(reference.embed(prompt, pil))
    return np.stack(out)


def test_raw_encode_matches_transformers_in_input_order(model, images, tmp_path, capsys):
    ckpt, reference = model
    source = _write(images, [row for row, _, _ in RAW_ROWS])
    out = tmp_path / "sub" / "emb.npy"
    assert _run(ckpt, source, out, "--raw", "--batch-size", "2") == 0
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (len(RAW_ROWS), 32)
    assert float(np.abs(got - _expected(reference, images)).max()) <= TOL
    assert "wrote 6x32 embeddings" in capsys.readouterr().err


BAD_LINES = [
    {"text": "A dog runs along the beach.", "image": None},
    "{not json",
    {"text": None, "image": "images/missing.png"},
    {"text": "Rain.", "image": None},
    {"text": None, "image": "images/corrupt.jpg"},
    {"text": None, "image": None},
    ["a", "list"],
    {"caption": "wrong key"},
    "",  # blank lines are ignored, not rows
    {"text": None, "image": "images/2.png"},
]


def test_skip_bad_writes_nan_rows_and_lists_them(model, images, tmp_path, capsys):
    ckpt, reference = model
    source = _write(images, BAD_LINES)
    out = tmp_path / "emb.npy"
    assert _run(ckpt, source, out, "--raw", "--skip-bad") == 0
    got = np.load(out)
    assert got.shape == (9, 32)
    bad = [1, 2, 4, 5, 6, 7]
    assert np.isnan(got[bad]).all() and not np.isnan(np.delete(got, bad, axis=0)).any()
    good = [RAW_ROWS[0], RAW_ROWS[3], RAW_ROWS[2]]
    assert float(np.abs(got[[0, 3, 8]] - _expected(reference, images, good)).max()) <= TOL
    err = capsys.readouterr().err
    for line in (2, 3, 5, 6, 7, 8):
        assert f"inputs.jsonl:{line}:" in err
    assert "missing.png does not exist" in err and "corrupt.jpg cannot be decoded" in err
    assert "(6 bad row(s) are NaN)" in err


def test_a_bad_line_stops_the_run_with_its_number_and_path(model, images, tmp_path, capsys):
    ckpt, _ = model
    source = _write(images, BAD_LINES[:1] + BAD_LINES[2:4])
    out = tmp_path / "emb.npy"
    assert _run(ckpt, source, out, "--raw") == 1
    err = capsys.readouterr().err
    assert "inputs.jsonl:2: image" in err and "images/missing.png does not exist" in err
    assert not out.exists()


def test_inputs_that_cannot_be_featurized_are_bad_lines_too(model, images, tmp_path, capsys):
    """An image with a text longer than max_len does not fit (image inputs are never cut)."""
    ckpt, _ = model
    long = {"text": "a very long question " * 30, "image": "images/3.png"}
    source = _write(images, [RAW_ROWS[0][0], long, RAW_ROWS[3][0]])
    out = tmp_path / "emb.npy"
    assert _run(ckpt, source, out, "--raw", "--max-len", "16") == 1
    assert "inputs.jsonl:2 (image" in capsys.readouterr().err and not out.exists()
    assert _run(ckpt, source, out, "--raw", "--max-len", "16", "--skip-bad") == 0
    got = np.load(out)
    assert np.isnan(got[1]).all() and not np.isnan(got[[0, 2]]).any()
    assert "not truncated: raise max_len" in capsys.readouterr().err


def test_help_explains_the_format_and_the_flags():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "unime_jax.encode", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    for needle in (
        '{"text": STRING or null, "image": PATH or null}',
        "--skip-bad",
        "--raw",
        "--instruction",
        "NaN",
    ):
        assert needle in result.stdout
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "m", "--input", "i", "--out", "o", "--raw", "--instruction", "x"])
    assert exit_info.value.code == 2

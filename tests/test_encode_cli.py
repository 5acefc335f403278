"""`python -m unime_jax.encode` on a tiny converted LLaVA-NeXT: parity with transformers, order, bad lines,
folder and parquet inputs with ids, resuming a killed run, and the files a failed run leaves (none)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.llava import SIZES, TOL, Reference, random_image, write_tiny_llava

from unime_jax import UniME
from unime_jax.conversion import convert_hf_dir
from unime_jax.encode import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _no_compilation_cache():
    with pytest.MonkeyPatch.context() as patch:  # tests never write to the user's cache
        patch.setenv("UNIME_JAX_COMPILATION_CACHE", "0")
        yield


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
    for line in (2, 3, 6, 7, 8):
        assert f"inputs.jsonl:{line}:" in err
    assert "inputs.jsonl:5 (image" in err  # found when the model decodes it (images are decoded once)
    assert "missing.png does not exist" in err and "cannot read image" in err and "corrupt.jpg" in err
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


# ------------------------------------------------------------------------------------------------
# Bulk inputs with ids, resuming, and what a failed run leaves behind
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unime(model) -> UniME:
    return UniME.load(model[0])


def _ids(out: Path) -> list[str]:
    return out.with_name(out.stem + ".ids.txt").read_text(encoding="utf-8").splitlines()


def test_an_image_folder_gives_one_row_per_image_with_relative_path_ids(model, unime, images, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / ".cache").mkdir()
    for name, source in (("b.png", 0), ("a.PNG", 1), ("sub/c.png", 3), (".cache/d.png", 2)):
        shutil.copy(images / "images" / f"{source}.png", folder / name)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "photos.npy"
    assert _run(model[0], folder, out) == 0
    assert _ids(out) == ["a.PNG", "b.png", "sub/c.png"]  # sorted; hidden and non-image files left out
    expected = unime.encode(images=[folder / name for name in _ids(out)])
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "photos.ids.txt", "photos.npy"]


def test_a_parquet_file_with_ids_texts_and_image_structs(model, unime, images, tmp_path):
    png = io.BytesIO()
    random_image(SIZES[2], 7).save(png, format="PNG")
    table = pa.table(
        {
            "key": ["q-1", "q-2", "q-3", "q-4"],
            "caption": ["A dog runs along the beach.", None, None, "Rain."],
            "img": [  # HF datasets' image struct: encoded bytes or a path
                None,
                {"bytes": png.getvalue(), "path": None},
                {"bytes": None, "path": "images/0.png"},
                None,
            ],
        }
    )
    source = images / "rows.parquet"
    pq.write_table(table, source, row_group_size=2)
    out = tmp_path / "rows.npy"
    flags = ("--id-column", "key", "--text-column", "caption", "--image-column", "img", "--chunk-rows", "3")
    assert _run(model[0], source, out, *flags) == 0
    assert _ids(out) == ["q-1", "q-2", "q-3", "q-4"]
    texts = ["A dog runs along the beach.", None, None, "Rain."]
    expected = unime.encode(texts, [None, png.getvalue(), images / "images" / "0.png", None])
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)
    assert _run(model[0], source, tmp_path / "x.npy", "--id-column", "name") == 2  # no such column


def test_a_line_that_is_not_utf8_is_a_one_line_error_or_a_skipped_row(model, images, tmp_path, capsys):
    source = images / "latin1.jsonl"
    source.write_bytes(b'{"text": "Rain."}\n{"text": "caf\xe9"}\n{"text": "Snow."}\n')
    out = tmp_path / "emb.npy"
    assert _run(model[0], source, out) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {source}:2: not valid UTF-8: byte 0xe9 at column 14" and not out.exists()
    assert _run(model[0], source, out, "--skip-bad") == 0
    got = np.load(out)
    assert np.isnan(got[1]).all() and not np.isnan(got[[0, 2]]).any()
    assert "(1 bad row(s) are NaN)" in capsys.readouterr().err


def test_an_unwritable_out_fails_before_the_model_is_loaded(images, tmp_path, capsys):
    source = _write(images, [RAW_ROWS[0][0]])
    (tmp_path / "a-file").write_text("")
    missing_model = tmp_path / "no-model"  # never reached: --out is checked first
    for out in (tmp_path / "a-file" / "emb.npy", tmp_path):
        assert main(["--model", str(missing_model), "--input", str(source), "--out", str(out)]) == 2
        assert "error: cannot write --out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_failed_run_leaves_no_partial_files(model, images, tmp_path, capsys):
    """The corrupt image is found by the model, after a first chunk was saved: all of it goes."""
    rows = [RAW_ROWS[0][0], RAW_ROWS[3][0], {"text": None, "image": "images/corrupt.jpg"}]
    source = _write(images, rows)
    out = tmp_path / "out" / "emb.npy"
    assert _run(model[0], source, out, "--raw", "--chunk-rows", "2") == 1
    assert "inputs.jsonl:3 (image" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


KILLED_AFTER_THE_FIRST_CHUNK = """
import os, signal, sys
from unime_jax import encode, encode_io
write = encode_io.Output.write
def write_then_die(self, *args):
    write(self, *args)
    os.kill(os.getpid(), signal.SIGKILL)
encode_io.Output.write = write_then_die
sys.exit(encode.main(sys.argv[1:]))
"""


def test_a_killed_run_resumes_after_its_last_saved_chunk(model, images, tmp_path, capsys):
    """A subprocess is killed right after saving its first chunk; the same command finishes the job.
    The subprocess runs with the default compilation cache, which lands in $XDG_CACHE_HOME."""
    texts = [f"Sentence number {i} is about {'dogs ' * i}." for i in range(10)]
    source = _write(images, [{"text": t} for t in texts])
    out = tmp_path / "emb.npy"
    args = ["--model", str(model[0]), "--input", str(source), "--out", str(out), "--no-progress"]
    args += ["--chunk-rows", "4", "--batch-size", "2"]
    env = {k: v for k, v in os.environ.items() if k != "UNIME_JAX_COMPILATION_CACHE"}
    env |= {
        "PYTHONPATH": str(ROOT),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # store even the tiny model's programs
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_THE_FIRST_CHUNK, *args], env=env, capture_output=True, text=True
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (
        not out.exists()
        and json.loads((tmp_path / "emb.npy.unfinished" / "progress.json").read_text())["done"] == 4
    )
    assert any((tmp_path / "cache" / "unime_jax" / "jax").iterdir())

    assert main(args) == 0
    assert f"resuming {tmp_path / 'emb.npy.unfinished'}: 4 of 10 rows are done" in capsys.readouterr().err
    assert main([*args[:5], str(tmp_path / "fresh.npy"), *args[6:]]) == 0
    np.testing.assert_allclose(np.load(out), np.load(tmp_path / "fresh.npy"), atol=1e-6)
    assert _ids(out) == [str(i) for i in range(1, 11)]  # line numbers without --id-column
    assert not (tmp_path / "emb.npy.unfinished").exists()

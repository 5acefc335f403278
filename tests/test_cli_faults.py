"""Bad inputs and faults through the other command lines (encode, convert, eval, mine, teacher): one line
naming the file, key or row, the documented exit status, no traceback (unless asked for), and no
half-written output, on a full or read-only disk too (a small tmpfs, where this machine can mount one).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.llava import write_tiny_llava
from helpers.nli import triplets, write_nli_csv, write_store

from convert.__main__ import main as convert_main
from unime_jax import encode, mine, train
from unime_jax.cli_errors import DEBUG_ENV
from unime_jax.data import teacher
from unime_jax.data.errors import DataError
from unime_jax.data.mmeb import MmebSource
from unime_jax.data.nli import NliSource, read_nli_csv
from unime_jax.eval import cli as eval_cli

REPO = Path(__file__).resolve().parents[1]


def _call(main, *args: str) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return status, err.getvalue()


def _one_line(stderr: str) -> str:
    """The error line of a failed command, after checking it is the only one and no traceback came."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str) -> Iterator[Path]:
    """A small tmpfs at ``path`` (a full or read-only disk to write to); skips where none can be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return write_tiny_llava(tmp_path_factory.mktemp("llava") / "hf", seed=3)


# ---------------------------------------------------------------------------------------------
# Every CLI: one line, its exit status; --debug or UNIME_JAX_DEBUG=1 adds the traceback.


@pytest.mark.parametrize(
    ("main", "args", "status", "message"),
    [
        (train.main, ["--config", "{tmp}/absent.yaml"], 2, "cannot read config file {tmp}/absent.yaml"),
        (encode.main, ["--model", "{tmp}", "--input", "{tmp}/a.jsonl", "--out", "{tmp}/e.npy"], 2, "input {tmp}/a.jsonl does not exist"),
        (eval_cli.main, ["mmeb", "--model", "{tmp}", "--data", "{tmp}/mmeb", "--out", "{tmp}/o"], 1, "--data {tmp}/mmeb is not a directory"),
        (mine.main, ["--model", "{tmp}/m", "--data", "{tmp}/c.yaml", "--out", "{tmp}/o"], 2, "model directory {tmp}/m does not exist"),
        (teacher.main, ["--model", "{tmp}", "--data", "{tmp}/nli.csv", "--out", "{tmp}/t"], 2, "cannot read NLI file {tmp}/nli.csv"),
        (convert_main, ["to-jax", "--hf-dir", "{tmp}/hf", "--out", "{tmp}/o"], 2, "{tmp}/hf is not a HuggingFace model directory"),
    ],
    ids=["train", "encode", "eval", "mine", "teacher", "convert"],
)  # fmt: skip
def test_every_cli_fails_with_one_line(tmp_path, main, args, status, message):
    code, stderr = _call(main, *(a.format(tmp=tmp_path) for a in args))
    assert code == status and message.format(tmp=tmp_path) in _one_line(stderr), stderr


def test_a_value_error_points_to_the_traceback_and_a_project_error_does_not(capsys):
    from unime_jax.cli_errors import run

    def library() -> int:
        raise ValueError("buffer size must be positive")  # from a library as well as from us

    def ours() -> int:
        raise DataError("rows.csv:3: empty text")

    assert run(library) == 1 and capsys.readouterr().err.strip() == (
        f"error: buffer size must be positive (rerun with --debug or {DEBUG_ENV}=1 for the traceback)"
    )
    assert run(ours) == 1 and capsys.readouterr().err.strip() == "error: rows.csv:3: empty text"


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    args = ["--config", str(tmp_path / "absent.yaml")]
    assert "Traceback" in _call(train.main, *args, "--debug")[1]
    monkeypatch.setenv(DEBUG_ENV, "1")
    code, stderr = _call(train.main, *args)
    assert code == 2 and "Traceback" in stderr and "error: cannot read config file" in stderr


# ---------------------------------------------------------------------------------------------
# convert: damaged inputs named; a full or read-only disk leaves nothing behind.


def _hf_copy(llava: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(llava, tmp_path / "hf"))


def test_convert_names_a_truncated_safetensors_file(llava, tmp_path):
    hf = _hf_copy(llava, tmp_path)
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, stderr = _call(convert_main, "to-jax", "--hf-dir", str(hf), "--out", str(tmp_path / "o"))
    assert code == 2 and f"error: {weights} is not a readable safetensors file" in _one_line(stderr)
    assert not (tmp_path / "o").exists()


def test_convert_names_an_invalid_config_json(llava, tmp_path):
    hf = _hf_copy(llava, tmp_path)
    (hf / "config.json").write_text('{"model_type": "llava_next",')
    code, stderr = _call(convert_main, "to-jax", "--hf-dir", str(hf), "--out", str(tmp_path / "o"))
    assert code == 2 and f"error: {hf / 'config.json'} is not valid JSON" in _one_line(stderr)


@pytest.mark.parametrize("disk", ["full", "read-only"])
def test_convert_on_a_full_or_read_only_disk_leaves_nothing(llava, tmp_path, disk):
    options = ("ro",) if disk == "read-only" else ()
    with tmpfs(tmp_path / "disk", "256k", *options) as mounted:
        code, stderr = _call(
            convert_main, "to-jax", "--hf-dir", str(llava), "--out", str(mounted / "ckpt"), "--no-progress"
        )
        line = _one_line(stderr)
        assert code == 1 and ("No space left on device" in line or "Read-only file system" in line), line
        assert list(mounted.iterdir()) == []  # no *.orbax-checkpoint-tmp, no half checkpoint


# ---------------------------------------------------------------------------------------------
# encode: bad bytes, an unwritable --out (both before the model loads), a full disk.


def test_encode_names_a_line_that_is_not_utf8_and_skip_bad_takes_it(llava, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"text": "a red circle"}\n{"text": "caf\xe9 au lait"}\n{"text": "a blue square"}\n')
    args = ["--input", str(source), "--out", str(tmp_path / "e.npy"), "--no-progress"]
    code, stderr = _call(encode.main, "--model", str(tmp_path / "no-model"), *args)  # the model is never read
    assert code == 1 and f"error: {source}:2: not valid UTF-8: byte 0xe9 at column 14" in _one_line(stderr)
    code, stderr = _call(encode.main, "--model", str(llava), *args, "--skip-bad")
    assert code == 0, stderr
    embeddings = np.load(tmp_path / "e.npy")
    assert np.isnan(embeddings[1]).all() and np.isfinite(embeddings[[0, 2]]).all()
    assert f"skipped: {source}:2: not valid UTF-8" in stderr


def test_encode_refuses_a_read_only_out_before_loading_the_model(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "a red circle"}\n')
    with tmpfs(tmp_path / "ro", "64k", "ro") as mounted:
        args = ["--input", str(source), "--out", str(mounted / "e.npy")]
        code, stderr = _call(encode.main, "--model", str(tmp_path / "no-model"), *args)
        assert code == 2 and f"error: cannot write --out {mounted / 'e.npy'}" in _one_line(stderr)


def test_encode_on_a_full_disk_fails_with_one_line_and_leaves_nothing(llava, tmp_path):
    """300 rows of 32 floats do not fit in 16 KiB. The space is claimed before any row is embedded,
    so the run stops with ENOSPC rather than dying of SIGBUS in a memory-mapped write."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": f"sentence {i}"}) + "\n" for i in range(300)))
    with tmpfs(tmp_path / "full", "16k") as mounted:
        command = ["-m", "unime_jax.encode", "--model", str(llava), "--input", str(source), "--no-progress"]
        proc = subprocess.run(
            [sys.executable, *command, "--out", str(mounted / "e.npy")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "No space left on device" in _one_line(proc.stderr)
        assert list(mounted.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Data files: what used to be a crash or a refusal is a named error or a skipped blank line.


def test_an_nli_csv_with_a_trailing_blank_line_is_read(tmp_path):
    csv = write_nli_csv(tmp_path / "nli.csv", triplets(3))
    csv.write_text(csv.read_text() + "\n")
    assert len(read_nli_csv(csv).rows) == 3


def test_an_integer_mmeb_column_is_named_with_its_type(tmp_path):
    (tmp_path / "Subset").mkdir()
    table = pa.table(
        {"qry": [1, 2], "qry_image_path": ["", ""], "pos_text": ["a", "b"], "pos_image_path": ["", ""]}
    )
    pq.write_table(table, tmp_path / "Subset" / "original-00000-of-00001.parquet")
    with pytest.raises(DataError, match=r"column 'qry' holds int64, not strings"):
        MmebSource(tmp_path)


def test_a_mismatched_teacher_store_suggests_a_command_that_works(tmp_path):
    first = write_nli_csv(tmp_path / "a.csv", triplets(3))
    write_store(tmp_path / "store", NliSource(first))
    other = write_nli_csv(tmp_path / "b.csv", triplets(4))
    with pytest.raises(DataError) as error:
        NliSource(other, tmp_path / "store")
    message = str(error.value)
    suggested = message.split(" --out ")[1].split()[0]
    assert f"--data {other} --out {suggested}" in message and f"data.nli.teacher_dir={suggested}" in message
    assert not Path(suggested).exists()  # the teacher CLI refuses only an existing store of another job

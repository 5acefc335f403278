"""`python -m convert verify`: our embeddings against transformers' (LLaVA-NeXT, LLaVA-OneVision)
and VLM2Vec's (Phi-3.5-V) on tiny random checkpoints, and a deliberately corrupted conversion that
fails by row."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers.llava import write_tiny_llava
from helpers.onevision import write_tiny_onevision
from helpers.phi3_v_reference import reference_clip, write_reference  # noqa: F401
from helpers.tokenizers import phi_tokenizer
from safetensors.numpy import load_file, save_file

from convert.__main__ import main
from unime_jax.eval.verify import ROWS, TOLERANCE, verify
from unime_jax.sharding import make_mesh

IMAGE_ROWS = [i for i, row in enumerate(ROWS) if row.image is not None]
TEXT_ROWS = [i for i, row in enumerate(ROWS) if row.image is None]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return write_tiny_llava(tmp_path_factory.mktemp("verify") / "llava")


@pytest.fixture(scope="module")
def phi3_v_dir(tmp_path_factory, reference_clip) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("verify") / "phi3_v"
    write_reference(out, vocab_size=32064)  # the Phi tokenizer's ids
    phi_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def onevision_dir(tmp_path_factory) -> Path:
    return write_tiny_onevision(tmp_path_factory.mktemp("verify") / "onevision")


def _corrupted_checkpoint(hf_dir: Path, tensor: str, out: Path) -> Path:
    """A conversion of `hf_dir` in which one tensor was damaged (its rows reversed), as a bad
    conversion rule would: the checkpoint loads, and only the inputs that reach that tensor change."""
    bad = out / "bad_hf"
    shutil.copytree(hf_dir, bad)
    weights = load_file(bad / "model.safetensors")
    weights[tensor] = np.ascontiguousarray(weights[tensor][::-1])
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    assert main(["to-jax", "--hf-dir", str(bad), "--out", str(out / "ckpt"), "--no-progress"]) == 0
    return out / "ckpt"


def test_llava_next_passes_and_prints_every_row(llava_dir, capsys):
    assert main(["verify", "--hf-dir", str(llava_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"llava_next, float32: pass when cosine >= {1 - TOLERANCE['float32']:.6f}"
    assert [line.split()[:2] for line in out[1:-1]] == [["row", str(i)] for i in range(len(ROWS))]
    assert all(line.endswith("ok") for line in out[1:-1])
    assert out[-1] == f"PASS: all {len(ROWS)} rows agree"


def test_llava_next_corrupted_conversion_fails_naming_the_image_rows(llava_dir, tmp_path, capsys):
    ckpt = _corrupted_checkpoint(llava_dir, "multi_modal_projector.linear_2.weight", tmp_path)
    capsys.readouterr()  # the conversion's own line
    assert main(["verify", "--hf-dir", str(llava_dir), "--ckpt", str(ckpt)]) == 1
    out = capsys.readouterr().out.splitlines()
    failed = out[-1]
    assert failed.startswith("FAIL: our embeddings differ from transformers' at row ")
    for i in IMAGE_ROWS:
        assert f"row {i} ({ROWS[i].name}: " in failed
    for i in TEXT_ROWS:  # text rows never reach the projector
        assert f"row {i} " not in failed and out[1 + i].endswith("ok")


@pytest.mark.parametrize(
    ("fixture", "model_type", "projector"),
    [
        ("phi3_v_dir", "phi3_v", "model.vision_embed_tokens.img_projection.2.weight"),
        ("onevision_dir", "llava_onevision", "multi_modal_projector.linear_2.weight"),
    ],
)
def test_passes_and_its_corrupted_conversion_fails(fixture, model_type, projector, request, tmp_path):
    hf_dir = request.getfixturevalue(fixture)
    # One device: the default mesh would replicate the model over conftest's 8 fake CPU devices.
    one = make_mesh(devices=jax.devices()[:1])
    report = verify(hf_dir, mesh=one)
    assert (report.model_type, report.dtype) == (model_type, "float32")
    assert report.passed, report.lines()
    assert min(r.cosine for r in report.rows) >= 1 - TOLERANCE["float32"]

    bad = verify(hf_dir, _corrupted_checkpoint(hf_dir, projector, tmp_path), mesh=one)
    assert [r.index for r in bad.rows if not r.passed] == IMAGE_ROWS
    assert bad.lines()[-1].startswith(
        f"FAIL: our embeddings differ from transformers' at row {IMAGE_ROWS[0]} ("
    )


def test_bad_arguments_fail_in_one_line(tmp_path, capsys):
    assert main(["verify", "--hf-dir", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --hf-dir {tmp_path / 'nothing'} is not an HF model directory (no config.json)"]

    (tmp_path / "config.json").write_text('{"model_type": "llava_next", "torch_dtype": "float64"}')
    assert main(["verify", "--hf-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: verify compares in float32, float16, bfloat16, not 'float64'; pass --dtype"]

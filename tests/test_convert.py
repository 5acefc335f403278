"""`python -m convert`: bit-exact round trips through the CLI, sharded files, layouts and errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from helpers import hf_models
from helpers.tensors import assert_bit_identical, tensors
from safetensors.numpy import load_file, save_file

from convert.__main__ import main
from unime_jax.conversion import ConversionError, load_hf_model
from unime_jax.conversion.safetensors_io import INDEX_FILE

REPO = Path(__file__).resolve().parents[1]






@pytest.mark.parametrize("family", ["llama", "mistral", "phi3", "clip_vision"])
def test_cli_round_trip_is_bit_exact(tmp_path, family):
    src = getattr(hf_models, family)(tmp_path / family)
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert main(["to-jax", "--hf-dir", str(src), "--out", str(ckpt), "--no-progress"]) == 0
    assert main(["to-hf", "--ckpt", str(ckpt), "--out", str(back), "--no-progress"]) == 0
    assert_bit_identical(tensors(src), tensors(back))
    assert (
        json.loads((back / "config.json").read_text())["model_type"]
        == json.loads((src / "config.json").read_text())["model_type"]
    )
    # transformers reloads the export with no missing or unexpected keys.
    auto = transformers.AutoModel if family == "clip_vision" else transformers.AutoModelForCausalLM
    _, info = auto.from_pretrained(back, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info


def test_sharded_input_and_output(tmp_path):
    src = hf_models.mistral(tmp_path / "src", max_shard_size="40KB")
    assert (src / INDEX_FILE).is_file(), "fixture should be sharded"
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert main(["to-jax", "--hf-dir", str(src), "--out", str(ckpt), "--no-progress"]) == 0
    assert (
        main(["to-hf", "--ckpt", str(ckpt), "--out", str(back), "--max-shard-size", "40KB", "--no-progress"])
        == 0
    )
    index = json.loads((back / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_bit_identical(tensors(src), tensors(back))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back)
    original = transformers.AutoModelForCausalLM.from_pretrained(src)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, original(ids).logits)


def test_bfloat16_conversion_and_export(tmp_path):
    src = hf_models.llama(tmp_path / "src")
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert (
        main(["to-jax", "--hf-dir", str(src), "--out", str(ckpt), "--dtype", "bfloat16", "--no-progress"])
        == 0
    )
    assert main(["to-hf", "--ckpt", str(ckpt), "--out", str(back), "--no-progress"]) == 0
    original, exported = tensors(src), tensors(back)
    assert {str(t.dtype) for t in exported.values()} == {"bfloat16"}
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value.astype(exported[key].dtype))
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(back, torch_dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_tokenizer_files_travel(tmp_path):
    src = hf_models.llama(tmp_path / "src")
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    main(["to-jax", "--hf-dir", str(src), "--out", str(ckpt), "--no-progress"])
    main(["to-hf", "--ckpt", str(ckpt), "--out", str(back), "--no-progress"])
    assert (ckpt / "tokenizer_config.json").read_text() == (back / "tokenizer_config.json").read_text()


def _rewrite(hf_dir: Path, edit) -> None:
    path = hf_dir / "model.safetensors"
    tensors = edit(load_file(path))
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    src = hf_models.llama(tmp_path / "src")
    _rewrite(src, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(
        ConversionError, match=r"missing HF tensors \(1\): model\.layers\.1\.mlp\.up_proj\.weight"
    ):
        load_hf_model(src, progress=False)


def test_wrong_shape_and_unexpected_tensor_are_named(tmp_path):
    src = hf_models.llama(tmp_path / "src")

    def edit(t):
        t["model.norm.weight"] = np.ones(65, np.float32)
        t["model.extra.weight"] = np.ones(3, np.float32)
        return t

    _rewrite(src, edit)
    with pytest.raises(ConversionError) as err:
        load_hf_model(src, progress=False)
    text = str(err.value)
    assert "wrong shapes (1): model.norm.weight: file (65,) vs model (64,)" in text
    assert "unexpected HF tensors (1): model.extra.weight" in text


def test_transformers_v5_clip_layout_is_accepted(tmp_path):
    """transformers 5 drops CLIPVisionModel's `vision_model.` prefix; both layouts convert the same."""
    src = hf_models.clip_vision(tmp_path / "src")
    reference = load_hf_model(src, progress=False)
    _rewrite(src, lambda t: {k.removeprefix("vision_model."): v for k, v in t.items()})
    v5 = load_hf_model(src, progress=False)
    pixels = np.random.default_rng(0).standard_normal((1, 3, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(v5.model(pixels)[1]), np.asarray(reference.model(pixels)[1]))


def test_errors_for_bad_directories(tmp_path, capsys):
    assert main(["to-jax", "--hf-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    src = hf_models.llama(tmp_path / "src")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["to-jax", "--hf-dir", str(src), "--out", str(busy)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "x"
    assert main(["to-hf", "--ckpt", str(src), "--out", str(tmp_path / "o2")]) == 2
    assert "unime_model.yaml is missing" in capsys.readouterr().err


def test_unsupported_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        load_hf_model(tmp_path, progress=False)


def test_help_runs_without_jax():
    out = subprocess.run(
        [sys.executable, "-m", "convert", "to-jax", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0
    assert "--hf-dir" in out.stdout and "--dtype" in out.stdout


def test_help_lists_the_registry():
    """--help answers without JAX, so its model types are written out: they must stay the registry's,
    and verify's those with a PyTorch reference."""
    from convert.__main__ import DESCRIPTION
    from unime_jax.backbones import SPECS

    supported, verified = DESCRIPTION.split("Supported model types:")[1].split("verify covers")
    named = {t for t in SPECS if re.search(rf"\b{t}\b", supported)}
    assert named == set(SPECS)
    assert {t for t in SPECS if re.search(rf"\b{t}\b", verified)} == {
        t for t, spec in SPECS.items() if spec.reference is not None
    }


def test_in_memory_state_dict_converts_like_the_files(tmp_path):
    """`load_from_source` takes a live PyTorch state dict (no disk) and builds the same model."""
    from unime_jax.conversion.safetensors_io import ArrayDict
    from unime_jax.conversion.to_jax import load_from_source

    src = hf_models.phi3(tmp_path / "phi3")
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(src)
    arrays = ArrayDict({k: v.detach().numpy() for k, v in torch_model.state_dict().items()})
    from_memory = load_from_source(arrays, torch_model.config.to_dict(), progress=False)
    from_files = load_hf_model(src, progress=False)
    ids = np.arange(10)[None] % hf_models.VOCAB
    np.testing.assert_array_equal(np.asarray(from_memory.model(ids)), np.asarray(from_files.model(ids)))

"""The SigLIP tower: parity with transformers' SiglipVisionModel (fp32, <= 1e-4), uint8 pixels, the
'valid' patch convolution, conversion round trips and the unsupported pooling head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from helpers.onevision import PATCH, SIGLIP, TILE
from helpers.tensors import assert_bit_identical, tensors

from convert.__main__ import main
from unime_jax.backbones import UnsupportedModelError
from unime_jax.backbones.siglip import siglip_from_hf
from unime_jax.conversion import load_hf_model
from unime_jax.models.clip import normalize_pixels

TOL = 1e-4
SIZE = TILE  # 4×4 patches; the last 2 pixel rows and columns fall outside every patch


def _write(out, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = transformers.SiglipVisionConfig(
        **(SIGLIP | {"num_hidden_layers": 3, "vision_use_head": False} | overrides)
    )
    model = transformers.SiglipVisionModel(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    path = tmp_path_factory.mktemp("siglip") / "hf"
    return path, _write(path), load_hf_model(path, progress=False)


@pytest.mark.parametrize("layer", [-1, -2, 0])
def test_hidden_states_match_transformers(siglip, layer):
    _, ref, loaded = siglip
    pixels = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[layer].numpy()
    ours = np.asarray(loaded.model.hidden_state(pixels, layer))
    assert ours.shape == (2, (SIZE // PATCH) ** 2, 32)
    assert np.abs(ours - expected).max() <= TOL


def test_last_hidden_state_and_uint8_pixels_match_transformers(siglip):
    """uint8 pixels normalised by the tower (SigLIP's 0.5 statistics) give HF's output on the floats."""
    _, ref, loaded = siglip
    raw = np.random.default_rng(1).integers(0, 256, (2, 3, SIZE, SIZE), dtype=np.uint8)
    floats = normalize_pixels(raw, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    np.testing.assert_allclose(floats, (raw / 255.0 - 0.5) / 0.5, rtol=0, atol=1e-6)
    with torch.no_grad():
        expected = ref(torch.from_numpy(floats)).last_hidden_state.numpy()
    assert np.abs(np.asarray(loaded.model(raw)) - expected).max() <= TOL


def test_cli_round_trip_is_bit_exact(siglip, tmp_path):
    src, _, _ = siglip
    assert main(["to-jax", "--hf-dir", str(src), "--out", str(tmp_path / "ckpt"), "--no-progress"]) == 0
    assert (
        main(["to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"), "--no-progress"])
        == 0
    )
    assert_bit_identical(tensors(src), tensors(tmp_path / "back"))
    _, info = transformers.SiglipVisionModel.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info


def test_the_pooling_head_is_refused_by_name(tmp_path):
    with pytest.raises(UnsupportedModelError, match="vision_use_head"):
        siglip_from_hf({"model_type": "siglip_vision_model"})  # transformers' default builds the head
    torch.manual_seed(0)
    transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(num_hidden_layers=1, **SIGLIP)
    ).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="pooling head"):
        load_hf_model(tmp_path, progress=False)

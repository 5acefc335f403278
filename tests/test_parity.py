"""Numerical parity of our Flax models with transformers' PyTorch models (fp32, <= 1e-4)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import hf_models

from unime_jax.conversion import load_hf_model
from unime_jax.model_io import abstract_model

TOL = 1e-4


def _batch(seq_len: int, lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded token ids (pad id 0) and their attention mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, hf_models.VOCAB, size=(len(lengths), seq_len))
    mask = (np.arange(seq_len)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    return ids * mask, mask


def _reference_hidden(ref: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    return out.hidden_states[-1].numpy()


def _max_real_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Largest |a-b| over real (unpadded) tokens."""
    return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    built = {}
    for name in ("llama", "mistral", "phi3"):
        path = getattr(hf_models, name)(root / name)
        built[name] = (path, hf_models.load_torch(path), load_hf_model(path, progress=False))
    return built


@pytest.mark.parametrize(
    ("family", "seq_len"),
    [("llama", 12), ("mistral", 12), ("phi3", 12), ("phi3", 2 * hf_models.PHI3_ORIGINAL_MAX)],
)
def test_decoder_final_hidden_states_match_transformers(decoders, family, seq_len):
    _, ref, loaded = decoders[family]
    ids, mask = _batch(seq_len, [seq_len, seq_len - 3, 5])
    ours = np.asarray(loaded.model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert ours.shape == (3, seq_len, 64)
    assert _max_real_diff(ours, _reference_hidden(ref, ids, mask), mask) <= TOL


def test_mistral_sliding_window_is_applied(decoders):
    """The window (5) is shorter than the sequence: dropping it must change the output."""
    _, ref, loaded = decoders["mistral"]
    ids, mask = _batch(12, [12, 12])
    no_window = dataclasses.replace(loaded.config, sliding_window=None)
    graphdef = nnx.graphdef(abstract_model(loaded.spec, no_window))
    without = nnx.merge(graphdef, nnx.state(loaded.model))
    ours = np.asarray(without(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert _max_real_diff(ours, _reference_hidden(ref, ids, mask), mask) > 1e-3


def test_phi3_long_sequences_switch_to_long_factors(decoders):
    """Past original_max_position_embeddings HF uses long_factor; the first tokens' states change too."""
    _, _, loaded = decoders["phi3"]
    short_len, long_len = 12, 2 * hf_models.PHI3_ORIGINAL_MAX
    ids, mask = _batch(long_len, [long_len])
    full = np.asarray(loaded.model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    prefix = np.asarray(
        loaded.model(jnp.asarray(ids[:, :short_len]), attention_mask=jnp.asarray(mask[:, :short_len]))
    )
    assert np.abs(full[:, :short_len] - prefix).max() > 1e-3


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = hf_models.clip_vision(tmp_path_factory.mktemp("clip") / "clip")
    return hf_models.load_torch(path), load_hf_model(path, progress=False)


def test_clip_hidden_states_and_pooler_match_transformers(clip):
    ref, loaded = clip
    pixels = np.random.default_rng(1).standard_normal((2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        out = ref(pixel_values=torch.tensor(pixels), output_hidden_states=True)
    n = loaded.config.num_hidden_layers
    for layer in range(-n - 1, 0):
        ours = np.asarray(loaded.model.hidden_state(jnp.asarray(pixels), layer))
        assert np.abs(ours - out.hidden_states[layer].numpy()).max() <= TOL, layer
    last, pooled = loaded.model(jnp.asarray(pixels))
    assert np.abs(np.asarray(last) - out.last_hidden_state.numpy()).max() <= TOL
    assert np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max() <= TOL


def test_clip_feature_layer_out_of_range_is_an_error(clip):
    _, loaded = clip
    with pytest.raises(ValueError, match="feature layer 7 out of range"):
        loaded.model.hidden_state(jnp.zeros((1, 3, 28, 28)), 7)

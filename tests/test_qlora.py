"""QLoRA (`LoRAConfig.quantize_base="nf4"`): NF4 frozen base through qwix, adapters that train, and
a merge that exports an ordinary bf16 HF directory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import hf_models
from helpers.batches import fixed_batch_losses, stage2_trainer
from safetensors import safe_open

from unime_jax.backbones.decoder_hf import lm_targets
from unime_jax.conversion import export_hf, load_hf_model
from unime_jax.conversion.to_jax import read_hf_config
from unime_jax.models import lora, nf4
from unime_jax.models.lora import LoRAConfig
from unime_jax.sharding import make_mesh

# QLoRA's NF4 code book (Dettmers et al. 2023, appendix E; bitsandbytes' table), written out here
# so that qwix's levels are checked against the paper's, not against themselves.
NF4_LEVELS = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    np.float32,
)  # fmt: skip
# The quantised model's final hidden states against the bf16 model's (relative Frobenius error) on
# the tiny random Mistral below. NF4 stores each random-normal weight to about 10% RMS (WEIGHT_TOL
# bounds it), and the 2-layer model's output moves by as much: measured 0.105.
QUANT_TOL = 0.15
WEIGHT_TOL = 0.12
BF16_TOL = 2e-2


def _reference_nf4(kernel: np.ndarray, block: int) -> np.ndarray:
    """QLoRA's dequantized weight in numpy: per block of `block` inputs and per output column, the
    absmax scale times the nearest NF4 level of w / absmax."""
    d_in, d_out = kernel.shape
    blocks = kernel.reshape(d_in // block, block, d_out)
    scale = np.abs(blocks).max(axis=1, keepdims=True)
    codes = np.abs(blocks[..., None] / scale[..., None] - NF4_LEVELS).argmin(-1)
    return (NF4_LEVELS[codes] * scale).reshape(d_in, d_out)


def test_nf4_is_qloras_code_book_with_blocks_of_64():
    kernel = np.asarray(jax.random.normal(jax.random.key(0), (256, 96)) * 0.02, np.float32)
    codes, scales = nf4.quantize(jnp.asarray(kernel))
    assert codes.dtype == jnp.uint4 and codes.shape == kernel.shape
    assert scales.shape == (256 // 64, 96) and scales.dtype == jnp.float32
    got = np.asarray(nf4.dequantize(codes, scales))
    want = _reference_nf4(kernel, 64)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert len(np.unique(got[:64, 0] / np.abs(kernel[:64, 0]).max())) > 8  # many levels in use
    assert nf4.block_size(96) == 32 and nf4.block_size(4096) == 64


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return hf_models.mistral(tmp_path_factory.mktemp("qlora") / "mistral")


IDS = np.random.default_rng(0).integers(3, hf_models.VOCAB, size=(2, 12))
MASK = np.ones_like(IDS)


def _hidden(model: nnx.Module) -> np.ndarray:
    return np.asarray(model(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)), np.float32)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _qlora(dropout: float = 0.0) -> LoRAConfig:
    return LoRAConfig(4, 8.0, dropout, lm_targets("mistral"), quantize_base="nf4")


def test_quantised_forward_is_within_tolerance_of_bf16(mistral):
    bf16 = dict(dtype="bfloat16", param_dtype="bfloat16", progress=False)
    base = _hidden(load_hf_model(mistral, **bf16).model)
    fp32 = _hidden(load_hf_model(mistral, progress=False).model)
    model = load_hf_model(mistral, **bf16).model
    adapted = lora.apply_lora(model, _qlora(), nnx.Rngs(0))
    proj = model.model.layers[0].mlp.down_proj
    assert not hasattr(proj, "kernel")
    assert isinstance(proj.kernel_nf4, nf4.NF4Param) and proj.kernel_nf4.get_value().dtype == jnp.uint4
    assert proj.kernel_nf4.get_metadata()["logical_axes"] == ("mlp", "embed")
    assert len(adapted) == 2 * 7
    assert all(not hasattr(linear, "kernel") for _, linear in lora.lora_modules(model))
    original = load_hf_model(mistral, **bf16).model.model.layers[0].mlp.down_proj.kernel.get_value()
    assert _rel(np.asarray(proj.base_kernel(), np.float32), np.asarray(original, np.float32)) <= WEIGHT_TOL
    quantised = _hidden(model)  # B = 0: the dequantized base alone
    assert 0 < _rel(quantised, base) <= QUANT_TOL, _rel(quantised, base)
    assert _rel(base, fp32) <= BF16_TOL  # bf16 itself is far closer: the gap is the quantisation


def test_qlora_adapters_train_then_merge_and_export_a_bf16_hf_directory(mistral, tmp_path):
    mesh = make_mesh(devices=jax.devices()[:1])
    loaded = load_hf_model(mistral, mesh, dtype="bfloat16", param_dtype="bfloat16", progress=False)
    model = loaded.model
    base_graph = nnx.graphdef(
        load_hf_model(mistral, mesh, dtype="bfloat16", param_dtype="bfloat16", progress=False).model
    )
    lora.apply_lora(model, _qlora(dropout=0.1), nnx.Rngs(0))
    codes = np.asarray(model.model.layers[1].self_attn.q_proj.kernel_nf4.get_value())
    trainer = stage2_trainer(model, mesh)
    state, losses = fixed_batch_losses(trainer, mesh)
    assert trainer._step_fn._cache_size() == 1
    assert losses[-1] < losses[0], losses

    trained = trainer.model(state)
    q_proj = trained.model.layers[1].self_attn.q_proj
    np.testing.assert_array_equal(np.asarray(q_proj.kernel_nf4.get_value()), codes)  # the base stays frozen
    assert float(jnp.abs(q_proj.lora_B.kernel.get_value()).max()) > 0
    before = _hidden(nnx.view(trained, deterministic=True, raise_if_not_found=False))
    lora.merge_lora(trained)
    assert nnx.graphdef(trained) == base_graph  # a plain model again
    assert trained.model.layers[1].self_attn.q_proj.kernel.get_value().dtype == jnp.bfloat16
    assert _rel(_hidden(trained), before) <= BF16_TOL

    out = tmp_path / "hf"
    export_hf(
        trained, loaded.spec, loaded.config, out, stored_hf_config=read_hf_config(mistral), progress=False
    )
    reference = hf_models.load_torch(out).float()
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(IDS), output_hidden_states=True).hidden_states[-1].numpy()
    ours = _hidden(load_hf_model(out, mesh, dtype="float32", param_dtype="float32", progress=False).model)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_dora_over_an_nf4_base_merges_into_what_it_computes(mistral):
    """DoRA's magnitudes start from the dequantized base's column norms, and the merge keeps the output."""
    model = load_hf_model(mistral, progress=False).model
    cfg = LoRAConfig(4, 8.0, 0.0, lm_targets("mistral"), variant="dora", quantize_base="nf4")
    lora.apply_lora(model, cfg, nnx.Rngs(0))
    proj = model.model.layers[0].self_attn.o_proj
    np.testing.assert_allclose(
        np.asarray(proj.lora_magnitude_vector.get_value()),
        np.linalg.norm(np.asarray(proj.base_kernel()), axis=0),
        rtol=1e-6,
    )
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.LoRAParam))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(
        model,
        jax.tree.unflatten(
            treedef, [x + 0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
        ),
    )
    adapted = _hidden(model)
    lora.merge_lora(model)
    assert proj.kernel.get_value().dtype == jnp.float32 and not hasattr(proj, "kernel_nf4")
    np.testing.assert_allclose(_hidden(model), adapted, atol=1e-5)

"""LoRA: regex targeting, merging, trainable filters, dropout RNG, and PEFT export against peft (fp32)."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import hf_models
from helpers.adapters import load_peft_quietly, merge_and_export
from safetensors import safe_open

from unime_jax.backbones import spec_for
from unime_jax.backbones.decoder_hf import lm_targets
from unime_jax.config import load_config
from unime_jax.conversion import load_hf_model
from unime_jax.conversion.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_peft
from unime_jax.models import lora
from unime_jax.models.lora import LoRAConfig
from unime_jax.runs.schema import Config
from unime_jax.runs.stages import lora_config

REPO = Path(__file__).resolve().parents[1]

FAMILIES = ("llama", "mistral", "phi3")
SEPARATE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
SEPARATE += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MODULES = {
    "llama": SEPARATE,
    "mistral": SEPARATE,
    "phi3": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
}
LAYERS = 2
MERGE_TOL = 1e-5
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    return {name: getattr(hf_models, name)(root / name) for name in FAMILIES}


def _batch(seq_len: int = 10, lengths: tuple[int, ...] = (10, 6)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, hf_models.VOCAB, size=(len(lengths), seq_len))
    mask = (np.arange(seq_len)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    return ids * mask, mask


IDS, MASK = _batch()
REAL = MASK.astype(bool)


def _forward(model: nnx.Module) -> np.ndarray:
    return np.asarray(model(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)), dtype=np.float32)


def _infer(model: nnx.Module) -> np.ndarray:
    """Evaluation-mode forward: dropout off (and no error for models without any)."""
    return _forward(nnx.view(model, deterministic=True, raise_if_not_found=False))


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b)[REAL].max())


def _randomize(model: nnx.Module, seed: int = 0, std: float = 0.05) -> None:
    """Random A and B (B is zero after apply_lora, which would hide any mistake in B's path)."""
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.LoRAParam))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    values = [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, values))


def _recipe(stage: int, loaded) -> LoRAConfig:
    """The paper's stage adapters as a run builds them: the YAML recipe on the backbone's projections."""
    section = getattr(
        load_config(REPO / "configs" / f"stage{stage}_common.yaml", (), Config), f"stage{stage}"
    )
    return lora_config(f"stage{stage}", section, loaded.spec, loaded.config)


def _lora_model(hf_dirs, family: str, *, dropout: float = 0.0, **runtime) -> tuple:
    loaded = load_hf_model(hf_dirs[family], progress=False, **runtime)
    cfg = LoRAConfig(rank=4, alpha=8.0, dropout=dropout, targets=lm_targets(family))
    lora.apply_lora(loaded.model, cfg, nnx.Rngs(0))
    _randomize(loaded.model)
    return loaded, cfg


def _paths(state: nnx.State) -> set[str]:
    return {".".join(str(p) for p in path) for path, _ in state.flat_state()}


# --------------------------------------------------------------------------------------------
# Targeting


@pytest.mark.parametrize("family", FAMILIES)
def test_presets_adapt_the_expected_projections(hf_dirs, family):
    loaded = load_hf_model(hf_dirs[family], progress=False)
    model = loaded.model
    base_paths = _paths(nnx.state(model))
    cfg = _recipe(1, loaded)
    assert (cfg.rank, cfg.alpha, cfg.dropout) == (32, 16.0, 0.05)
    adapted = lora.apply_lora(model, cfg, nnx.Rngs(0))

    expected = {f"model.layers.{i}.{m}" for i in range(LAYERS) for m in MODULES[family]}
    assert sorted(adapted) == sorted(expected)
    adapters = nnx.state(model, nnx.LoRAParam)
    assert _paths(adapters) == {f"{p}.lora_{f}.kernel" for p in expected for f in "AB"}
    assert _paths(nnx.state(model, nnx.Param)) == base_paths | _paths(adapters)
    q = model.model.layers[0].self_attn.o_proj
    assert q.lora_A.kernel.get_value().shape == (64, cfg.rank)
    assert q.lora_B.kernel.get_value().shape == (cfg.rank, 64)
    assert q.lora_A.kernel.get_metadata()["logical_axes"] == ("heads", "lora_rank")
    assert q.lora_B.kernel.get_metadata()["logical_axes"] == ("lora_rank", "embed")
    assert q.lora_scale == cfg.alpha / cfg.rank
    with pytest.raises(ValueError, match="already have LoRA adapters"):
        lora.apply_lora(model, cfg, nnx.Rngs(0))


def test_unmatched_regex_is_an_error_naming_it(hf_dirs):
    model = load_hf_model(hf_dirs["llama"], progress=False).model
    regex = r"model\.layers\.\d+\.self_attn\.qkv_proj"  # Phi-3's name, absent from Llama
    with pytest.raises(ValueError, match=re.escape(repr(regex))):
        lora.apply_lora(model, LoRAConfig(rank=2, alpha=2.0, dropout=0.0, targets=regex), nnx.Rngs(0))


def test_prefix_and_vision_targets():
    from helpers.tiny_configs import llava_config, phi3_v_config

    lm = {
        "llava_next": "language_model.model.layers.31.mlp.gate_proj",
        "phi3_v": "model.layers.3.mlp.gate_up_proj",
    }
    towers = {
        "llava_next": "vision_tower.vision_model.encoder.layers.0.self_attn.out_proj",
        "phi3_v": "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.23.self_attn.q_proj",
    }
    for model_type, cfg in (("llava_next", llava_config()), ("phi3_v", phi3_v_config())):
        spec = spec_for(model_type)
        lm_only = re.compile(spec.lora_targets(cfg))
        both = re.compile(spec.lora_targets(cfg, vision=True))
        assert lm_only.fullmatch(lm[model_type]) and both.fullmatch(lm[model_type])
        assert both.fullmatch(towers[model_type]) and not lm_only.fullmatch(towers[model_type])
    assert not re.fullmatch(
        spec_for("llava_next").lora_targets(llava_config()), "model.layers.0.mlp.gate_proj"
    )
    both = re.compile(spec_for("llava_next").lora_targets(llava_config(), vision=True))
    for never in ("vision_tower.vision_model.encoder.layers.0.mlp.fc1", "language_model.lm_head"):
        assert not both.fullmatch(never)


# --------------------------------------------------------------------------------------------
# Numerics: zero init, merge


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_init_is_identity_and_merge_matches(hf_dirs, family):
    loaded = load_hf_model(hf_dirs[family], progress=False)
    model = loaded.model
    base_out = _forward(model)
    base_graph, base_state = nnx.split(load_hf_model(hf_dirs[family], progress=False).model)

    cfg = _recipe(2, loaded)  # dropout 0.1: eval mode must ignore it
    assert (cfg.rank, cfg.alpha, cfg.dropout) == (16, 64.0, 0.1)
    lora.apply_lora(model, cfg, nnx.Rngs(1))
    np.testing.assert_array_equal(_infer(model), base_out)

    _randomize(model)
    adapted_out = _infer(model)
    assert _max_diff(adapted_out, base_out) > 1e-2
    merged = lora.merge_lora(model)
    assert len(merged) == LAYERS * len(MODULES[family])
    assert _max_diff(_forward(model), adapted_out) <= MERGE_TOL
    graph, state = nnx.split(model)
    assert graph == base_graph
    assert jax.tree.structure(state) == jax.tree.structure(base_state)


def test_bf16_base_keeps_its_dtype_with_fp32_adapters(hf_dirs):
    loaded = load_hf_model(hf_dirs["phi3"], progress=False, param_dtype="bfloat16", dtype="bfloat16")
    model = loaded.model
    lora.apply_lora(model, _recipe(1, loaded), nnx.Rngs(0))
    kinds = {type(v).__name__: v.get_value().dtype for _, v in nnx.state(model, nnx.Param).flat_state()}
    assert kinds == {"Param": jnp.bfloat16, "LoRAParam": jnp.float32}
    assert _infer(model).dtype == np.float32 and model(jnp.asarray(IDS)).dtype == jnp.bfloat16
    lora.merge_lora(model)
    assert {v.get_value().dtype for _, v in nnx.state(model).flat_state()} == {jnp.dtype(jnp.bfloat16)}


# --------------------------------------------------------------------------------------------
# Training: trainable filter, gradients, dropout RNG


def test_gradients_reach_only_the_adapters(hf_dirs):
    loaded, _ = _lora_model(hf_dirs, "llama")
    model = loaded.model
    adapters = nnx.state(model, nnx.LoRAParam)
    assert lora.trainable_filter(model) is nnx.LoRAParam
    trainable, total = lora.param_counts(model)
    n_adapters = sum(x.size for x in jax.tree.leaves(adapters))
    n_base = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Not(nnx.LoRAParam))))
    assert (trainable, total) == (n_adapters, n_base + n_adapters)

    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    assert not _paths(params) & _paths(frozen)
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in frozen.flat_state())

    def loss(p: nnx.State) -> jax.Array:
        return jnp.mean(nnx.merge(graphdef, p, frozen)(jnp.asarray(IDS)) ** 2)

    grads = jax.grad(loss)(params)
    assert _paths(grads) == _paths(adapters)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))

    lora.merge_lora(model)
    assert lora.trainable_filter(model) is nnx.Param  # full fine-tuning
    assert lora.param_counts(model) == (n_base, n_base)


def test_dropout_masks_follow_the_reseeded_key(hf_dirs):
    loaded, _ = _lora_model(hf_dirs, "llama", dropout=0.5)
    model = loaded.model

    def train_forward(key: int) -> np.ndarray:
        lora.reseed_lora_dropout(model, key)
        return _forward(model)

    first = train_forward(1)
    np.testing.assert_array_equal(train_forward(1), first)
    assert _max_diff(train_forward(2), first) > 1e-3
    clean = _infer(model)
    assert _max_diff(clean, first) > 1e-3
    lora.reseed_lora_dropout(model, 3)
    np.testing.assert_array_equal(_infer(model), clean)

    # Inside jit, functionally, as a GradCache step runs its two passes over one chunk: a no-grad
    # embedding pass, then a recompute under jax.vjp, both from the same chunk key.
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)

    @jax.jit
    def gradcache_passes(p: nnx.State, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        def embed(p_: nnx.State) -> jax.Array:
            m = nnx.merge(graphdef, p_, lora.lora_dropout_keys(frozen, key), copy=True)
            return m(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK))

        recomputed, _ = jax.vjp(embed, p)
        return jax.lax.stop_gradient(embed(p)), recomputed

    no_grad_pass, recompute_pass = map(np.asarray, gradcache_passes(params, jax.random.key(1)))
    np.testing.assert_array_equal(no_grad_pass, recompute_pass)
    assert _max_diff(no_grad_pass, first) <= MERGE_TOL  # the same masks as the eager reseed(1)


def test_dropout_masks_come_from_the_rbg_generator(hf_dirs):
    """Masks are RngBitGenerator bits (cheap), not threefry's; the step key's own layout is unchanged."""
    loaded, _ = _lora_model(hf_dirs, "mistral", dropout=0.5)
    graphdef, params, frozen = nnx.split(loaded.model, nnx.LoRAParam, ...)
    fresh = jax.tree.leaves(lora.lora_dropout_keys(frozen, jax.random.PRNGKey(3)))
    keys = [v for v in fresh if jnp.issubdtype(v.dtype, jax.dtypes.prng_key)]
    assert keys and all(str(jax.random.key_impl(k)) == "rbg" for k in keys)

    def forward(p: nnx.State, key: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, p, lora.lora_dropout_keys(frozen, key), copy=True)
        return model(jnp.asarray(IDS))

    hlo = jax.jit(forward).lower(params, jax.random.PRNGKey(3)).as_text()
    assert "rng_bit_generator" in hlo
    # Same key, same masks; another key, other masks.
    first = np.asarray(jax.jit(forward)(params, jax.random.PRNGKey(3)))
    np.testing.assert_array_equal(np.asarray(jax.jit(forward)(params, jax.random.PRNGKey(3))), first)
    assert _max_diff(np.asarray(jax.jit(forward)(params, jax.random.PRNGKey(4))), first) > 1e-3


def test_no_dropout_needs_no_rng_state(hf_dirs):
    loaded, _ = _lora_model(hf_dirs, "phi3", dropout=0.0)
    assert not nnx.state(loaded.model, nnx.RngState)


def test_remat_replays_the_dropout_masks(hf_dirs):
    """Rematerialised layers recompute their masks in the backward pass: gradients must not change."""

    def grads(remat: str) -> list[np.ndarray]:
        loaded, _ = _lora_model(hf_dirs, "mistral", dropout=0.5, remat=remat)
        graphdef, params, frozen = nnx.split(loaded.model, nnx.LoRAParam, ...)

        def loss(p: nnx.State) -> jax.Array:
            model = nnx.merge(graphdef, p, lora.lora_dropout_keys(frozen, 7), copy=True)
            return jnp.mean(model(jnp.asarray(IDS)) ** 2)

        return [np.asarray(g) for g in jax.tree.leaves(jax.grad(loss)(params))]

    for plain, remat in zip(grads("none"), grads("full"), strict=True):
        np.testing.assert_allclose(remat, plain, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------
# PEFT export


def _torch_hidden(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), output_hidden_states=True)
    return out.hidden_states[-1].numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_and_merged_export_match_peft(hf_dirs, family, tmp_path, caplog):
    loaded, cfg = _lora_model(hf_dirs, family, dropout=0.05)
    model = loaded.model
    ours = _infer(model)
    modules = export_peft(
        model, loaded.spec, cfg, tmp_path / "adapter", base_model_name_or_path=str(hf_dirs[family])
    )
    assert sorted(modules) == sorted(f"model.layers.{i}.{m}" for i in range(LAYERS) for m in MODULES[family])
    assert (tmp_path / "adapter" / ADAPTER_CONFIG).is_file()
    with safe_open(tmp_path / "adapter" / ADAPTER_WEIGHTS, "np") as f:
        assert "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight" in f.keys()  # noqa: SIM118

    peft_model = load_peft_quietly(hf_models.load_torch(hf_dirs[family]), tmp_path / "adapter", caplog)
    assert _max_diff(_torch_hidden(peft_model), ours) <= TOL

    reference = _torch_hidden(peft_model.merge_and_unload())
    merged = merge_and_export(model, loaded, hf_dirs[family], tmp_path / "merged")
    assert _max_diff(_torch_hidden(merged), reference) <= TOL


def test_peft_export_checks_the_config(hf_dirs, tmp_path):
    loaded, cfg = _lora_model(hf_dirs, "llama")
    other_alpha = LoRAConfig(rank=cfg.rank, alpha=2 * cfg.alpha, dropout=0.0, targets=cfg.targets)
    with pytest.raises(ValueError, match="scale"):
        export_peft(loaded.model, loaded.spec, other_alpha, tmp_path, base_model_name_or_path="x")
    with pytest.raises(ValueError, match="layout_index"):
        export_peft(loaded.model, loaded.spec, cfg, tmp_path, base_model_name_or_path="x", layout_index=3)

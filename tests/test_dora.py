"""DoRA (`LoRAConfig.variant="dora"`) against peft's own DoRA layer (fp32): forward, gradients, merge,
and the PEFT export that peft loads with `use_dora=True`."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import hf_models
from helpers.adapters import load_peft_quietly, merge_and_export
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLinear
from safetensors import safe_open

from unime_jax.backbones.decoder_hf import lm_targets
from unime_jax.conversion import load_hf_model
from unime_jax.conversion.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_peft
from unime_jax.models import lora
from unime_jax.models.layers import Linear
from unime_jax.models.lora import LoRAConfig

TOL = 1e-4
GRAD_TOL = 1e-4
FAMILIES = ("llama", "phi3")  # separate and fused projections
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dora")
    return {name: getattr(hf_models, name)(root / name) for name in FAMILIES}


def _batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, hf_models.VOCAB, size=(2, 10))
    mask = (np.arange(10)[None] < np.asarray([10, 6])[:, None]).astype(np.int64)
    return ids * mask, mask


IDS, MASK = _batch()
REAL = MASK.astype(bool)
# A fixed projection of the hidden states: the scalar both frameworks differentiate.
PROBE = np.random.default_rng(1).standard_normal((*IDS.shape, 64)).astype(np.float32) * MASK[..., None]


def _flat(state: nnx.State) -> dict[str, np.ndarray]:
    """Dotted path -> array of every leaf of a (gradient) state."""
    return {
        ".".join(str(p) for p in path): np.asarray(getattr(leaf, "get_value", lambda leaf=leaf: leaf)())
        for path, leaf in state.flat_state()
    }


def _perturb(model: nnx.Module, seed: int = 0) -> None:
    """Random B (zero after apply_lora) and magnitudes away from the column norms, so every term counts."""
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.LoRAParam))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    values = []
    for key, x in zip(keys, leaves, strict=True):
        noise = jax.random.normal(key, x.shape, x.dtype)
        values.append(x * (1 + 0.3 * noise) if x.ndim == 1 else x + 0.05 * noise)
    nnx.update(model, jax.tree.unflatten(treedef, values))


def _dora_model(hf_dirs, family: str) -> tuple:
    loaded = load_hf_model(hf_dirs[family], progress=False)
    cfg = LoRAConfig(RANK, ALPHA, 0.0, lm_targets(family), variant="dora", init="gaussian")
    lora.apply_lora(loaded.model, cfg, nnx.Rngs(0))
    return loaded, cfg


def _hidden(model: nnx.Module) -> np.ndarray:
    return np.asarray(model(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))


def _torch_hidden(model: torch.nn.Module) -> torch.Tensor:
    out = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), output_hidden_states=True)
    return out.hidden_states[-1]


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b)[REAL].max())


def test_dora_parameters_init_and_merge(hf_dirs):
    loaded, _ = _dora_model(hf_dirs, "llama")
    model = loaded.model
    proj = model.model.layers[0].mlp.down_proj
    kernel = np.asarray(proj.kernel.get_value())
    np.testing.assert_allclose(
        np.asarray(proj.lora_magnitude_vector.get_value()), np.linalg.norm(kernel, axis=0), rtol=1e-6
    )
    assert proj.lora_magnitude_vector.get_metadata()["logical_axes"] == ("embed",)
    assert isinstance(proj.lora_magnitude_vector, nnx.LoRAParam)
    a = np.asarray(proj.lora_A.kernel.get_value())
    assert abs(a.std() - 1 / RANK) < 0.1 / RANK  # PEFT's gaussian init: N(0, 1/r)

    base = _hidden(load_hf_model(hf_dirs["llama"], progress=False).model)
    np.testing.assert_array_equal(_hidden(model), base)  # B = 0 and gain 1: the base model exactly

    _perturb(model)
    adapted = _hidden(model)
    assert _max_diff(adapted, base) > 1e-2
    assert len(lora.merge_lora(model)) == 2 * 7
    assert not hasattr(proj, "lora_magnitude_vector")
    assert _max_diff(_hidden(model), adapted) <= 1e-5


def test_config_refuses_unknown_variant_and_init():
    with pytest.raises(ValueError, match="variant must be one of"):
        LoRAConfig(RANK, ALPHA, 0.0, "x", variant="vera")
    with pytest.raises(ValueError, match="init must be one of"):
        LoRAConfig(RANK, ALPHA, 0.0, "x", init="pissa")


def _torch_grads(peft_model: torch.nn.Module) -> dict[str, np.ndarray]:
    peft_model.zero_grad()
    loss = (_torch_hidden(peft_model) * torch.tensor(PROBE)).sum()
    loss.backward()
    return {
        name: p.grad.numpy()
        for name, p in peft_model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def _our_grads(model: nnx.Module) -> dict[str, np.ndarray]:
    """Gradients of the same scalar, keyed by peft's in-memory parameter names, in torch layouts."""
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(p: nnx.State) -> jax.Array:
        hidden = nnx.merge(graphdef, p, rest)(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK))
        return jnp.sum(hidden * PROBE)

    grads = {}
    for path, array in _flat(jax.grad(loss)(params)).items():
        if path.endswith(".kernel"):
            path, array = path[: -len(".kernel")], array.T
            path = (
                path.replace(".lora_A", ".lora_A.default").replace(".lora_B", ".lora_B.default") + ".weight"
            )
        else:
            path = path.replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight")
        grads["base_model.model." + path] = array
    return grads


@pytest.mark.parametrize("family", FAMILIES)
def test_dora_matches_peft_forward_gradients_and_merge(hf_dirs, family, tmp_path, caplog):
    loaded, cfg = _dora_model(hf_dirs, family)
    model = loaded.model
    _perturb(model)
    ours = _hidden(model)
    export_peft(model, loaded.spec, cfg, tmp_path / "adapter", base_model_name_or_path=str(hf_dirs[family]))
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert (config["use_dora"], config["init_lora_weights"]) == (True, "gaussian")
    with safe_open(tmp_path / "adapter" / ADAPTER_WEIGHTS, "np") as f:
        magnitude = f.get_tensor("base_model.model.model.layers.0.self_attn.o_proj.lora_magnitude_vector")
    np.testing.assert_array_equal(
        magnitude, np.asarray(model.model.layers[0].self_attn.o_proj.lora_magnitude_vector.get_value())
    )

    base = hf_models.load_torch(hf_dirs[family])
    peft_model = load_peft_quietly(base, tmp_path / "adapter", caplog, is_trainable=True)
    assert peft_model.peft_config["default"].use_dora
    peft_model.eval()  # dropout 0; eval keeps PEFT on the path that reuses the base output

    with torch.no_grad():
        assert _max_diff(_torch_hidden(peft_model).numpy(), ours) <= TOL

    theirs, mine = _torch_grads(peft_model), _our_grads(model)
    assert sorted(theirs) == sorted(mine)
    assert any("lora_magnitude_vector" in name for name in mine)
    for name, grad in theirs.items():
        assert np.abs(grad).max() > 0, name
        np.testing.assert_allclose(
            mine[name], grad, atol=GRAD_TOL * np.abs(grad).max(), rtol=GRAD_TOL, err_msg=name
        )

    with torch.no_grad():
        reference = _torch_hidden(peft_model.merge_and_unload()).numpy()
    merged = merge_and_export(model, loaded, hf_dirs[family], tmp_path / "merged")
    with torch.no_grad():
        assert _max_diff(_torch_hidden(merged).numpy(), reference) <= TOL


class _FixedDropout(torch.nn.Module):
    """Stands in for PEFT's dropout with our layer's dropped-out input, so both draw the same mask."""

    def __init__(self, dropped: np.ndarray) -> None:
        super().__init__()
        self.dropped = torch.tensor(dropped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropped


class _Holder(nnx.Module):
    def __init__(self) -> None:
        self.proj = Linear(
            16,
            12,
            use_bias=True,
            axes=(None, None),
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            rngs=nnx.Rngs(0),
        )


def test_dora_layer_with_active_dropout_matches_peft():
    """With dropout active PEFT recomputes the base term on the dropped-out input; so must we."""
    holder = _Holder()
    holder.proj.bias.set_value(jnp.linspace(-1, 1, 12))
    lora.apply_lora(
        holder, LoRAConfig(RANK, ALPHA, 0.5, "proj", variant="dora", init="gaussian"), nnx.Rngs(1)
    )
    _perturb(holder, seed=3)
    layer = holder.proj
    x = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    probe = np.random.default_rng(3).standard_normal((5, 12)).astype(np.float32)

    lora.reseed_lora_dropout(holder, 7)
    dropped = np.asarray(layer.lora_dropout(jnp.asarray(x)))
    assert (dropped == 0).any()
    graphdef, params, rest = nnx.split(holder, nnx.LoRAParam, ...)

    def loss(p: nnx.State) -> tuple[jax.Array, jax.Array]:
        y = nnx.merge(graphdef, p, lora.lora_dropout_keys(rest, 7), copy=True).proj(jnp.asarray(x))
        return jnp.sum(y * probe), y

    (_, ours), grads = jax.value_and_grad(loss, has_aux=True)(params)

    base = torch.nn.Linear(16, 12)
    with torch.no_grad():
        base.weight.copy_(torch.tensor(np.asarray(layer.kernel.get_value()).T))
        base.bias.copy_(torch.tensor(np.asarray(layer.bias.get_value())))
    peft_config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.5, use_dora=True, init_lora_weights="gaussian"
    )
    peft_layer = PeftLinear(
        base, "default", peft_config, r=RANK, lora_alpha=ALPHA, lora_dropout=0.5, use_dora=True
    )
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(torch.tensor(np.asarray(layer.lora_A.kernel.get_value()).T))
        peft_layer.lora_B["default"].weight.copy_(torch.tensor(np.asarray(layer.lora_B.kernel.get_value()).T))
        peft_layer.lora_magnitude_vector["default"].weight.copy_(
            torch.tensor(np.asarray(layer.lora_magnitude_vector.get_value()))
        )
    peft_layer.lora_dropout["default"] = _FixedDropout(dropped)
    peft_layer.train()
    theirs = peft_layer(torch.tensor(x))
    (theirs * torch.tensor(probe)).sum().backward()

    np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), atol=1e-5)
    # Reusing x @ W for the base term (right only without dropout) would be this far off:
    gain = np.asarray(layer.dora_gain())
    reused = np.asarray(ours) + (gain - 1) * ((x - dropped) @ np.asarray(layer.kernel.get_value()))
    assert np.abs(reused - theirs.detach().numpy()).max() > 1e-2
    want = {
        "proj.lora_A.kernel": peft_layer.lora_A["default"].weight.grad.numpy().T,
        "proj.lora_B.kernel": peft_layer.lora_B["default"].weight.grad.numpy().T,
        "proj.lora_magnitude_vector": peft_layer.lora_magnitude_vector["default"].weight.grad.numpy(),
    }
    got = _flat(grads)
    assert sorted(got) == sorted(want)
    for path, value in want.items():
        np.testing.assert_allclose(got[path], value, atol=1e-5, rtol=1e-4, err_msg=path)


def test_dora_trains_through_gradcache_on_a_sharded_mesh(hf_dirs, tmp_path):
    """The trainer takes DoRA as it takes LoRA: magnitudes are trained (sharded like their column
    axis), dropout replays in GradCache's second pass, and the step compiles once."""
    from helpers.batches import fixed_batch_losses, stage2_trainer

    from unime_jax.sharding import make_mesh

    mistral = hf_models.mistral(tmp_path / "mistral")
    mesh = make_mesh(data=2, fsdp=-1)
    model = load_hf_model(mistral, mesh, progress=False).model
    lora.apply_lora(model, LoRAConfig(RANK, ALPHA, 0.1, lm_targets("mistral"), variant="dora"), nnx.Rngs(0))
    start = np.asarray(model.model.layers[0].mlp.down_proj.lora_magnitude_vector.get_value())
    trainer = stage2_trainer(model, mesh)
    state, losses = fixed_batch_losses(trainer, mesh)
    assert trainer._step_fn._cache_size() == 1
    assert losses[-1] < losses[0], losses
    magnitude = state.params["model"]["layers"][0]["mlp"]["down_proj"]["lora_magnitude_vector"][...]
    assert np.abs(np.asarray(magnitude) - start).max() > 1e-4
    assert magnitude.sharding.spec == jax.sharding.PartitionSpec("fsdp")

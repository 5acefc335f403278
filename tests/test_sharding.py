"""The rules table, meshes, and a model sharded over 8 fake CPU devices giving the same output."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import hf_models
from jax.sharding import NamedSharding, PartitionSpec

from unime_jax.conversion import load_hf_model
from unime_jax.model_io import abstract_model
from unime_jax.sharding import logical_to_spec, make_mesh


def test_make_mesh_fills_minus_one_and_rejects_bad_sizes():
    mesh = make_mesh(data=2, fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 6 devices, 8 are available"):
        make_mesh(data=3, fsdp=2, tensor=1)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        make_mesh(data=-1, fsdp=-1)


def test_logical_rules_drop_axes_that_do_not_divide():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert logical_to_spec(("embed", "heads"), (64, 128), mesh) == PartitionSpec("fsdp", "tensor")
    assert logical_to_spec(("embed", "qkv_fused"), (64, 192), mesh) == PartitionSpec("fsdp", None)
    assert logical_to_spec(("batch", "seq", "act_embed"), (4, 7, 64), mesh) == PartitionSpec(
        ("data", "fsdp"), None, None
    )
    assert logical_to_spec(("batch", "seq", "act_embed"), (3, 7, 64), mesh) == PartitionSpec(None, None, None)
    with pytest.raises(KeyError, match="no rule"):
        logical_to_spec(("nonsense",), (4,), mesh)


@pytest.mark.parametrize("family", ["mistral", "phi3"])
def test_sharded_forward_matches_single_device(tmp_path, family):
    src = getattr(hf_models, family)(tmp_path / family)
    single = load_hf_model(src, make_mesh(devices=jax.devices()[:1]), progress=False)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = load_hf_model(src, mesh, progress=False)
    kernel = sharded.model.model.layers[0].mlp.down_proj.kernel[...]
    assert kernel.sharding.spec == PartitionSpec("tensor", "fsdp")
    assert {s.data.shape for s in kernel.addressable_shards} == {(64, 32)}

    rng = np.random.default_rng(0)
    ids = rng.integers(3, hf_models.VOCAB, size=(4, 16))
    mask = (np.arange(16)[None] < np.array([16, 10, 7, 3])[:, None]).astype(np.int32)
    expected = np.asarray(single.model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))

    graphdef, state = nnx.split(sharded.model)
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask)

    with jax.set_mesh(mesh):
        out = forward(state, jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding))
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_remat_gives_identical_values_and_gradients(tmp_path):
    loaded = load_hf_model(hf_models.llama(tmp_path / "llama"), progress=False)
    remat_cfg = dataclasses.replace(loaded.config, remat="full")
    remat = nnx.merge(nnx.graphdef(abstract_model(loaded.spec, remat_cfg)), nnx.state(loaded.model))
    ids = jnp.arange(2 * 9).reshape(2, 9) % hf_models.VOCAB

    def loss(model):
        return jnp.sum(model(ids) ** 2)

    plain_value, plain_grad = nnx.value_and_grad(loss)(loaded.model)
    remat_value, remat_grad = nnx.value_and_grad(loss)(remat)
    np.testing.assert_allclose(remat_value, plain_value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), remat_grad, plain_grad)

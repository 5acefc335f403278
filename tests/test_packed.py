"""The packed layout: regrouped rows give the padded batch's losses and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.llava import random_image
from helpers.onevision import onevision_config, qwen2_tokenizer
from helpers.tiny_configs import llava_config, phi3_v_config
from helpers.tokenizers import llava_tokenizer, phi_tokenizer

from unime_jax.backbones import spec_for
from unime_jax.data.batching import stack_examples
from unime_jax.data.packing import PackSpec, pack_batch, pack_classes, packed_lengths
from unime_jax.model_io import init_model
from unime_jax.models import lora
from unime_jax.processing.text import TRUNCATED
from unime_jax.sharding import LOGICAL_RULES, global_batch, make_mesh
from unime_jax.training.gradcache import direct_value_and_grad
from unime_jax.training.packed import split_roles
from unime_jax.training.sections import LayoutSection, StageSection
from unime_jax.training.tasks import Stage2Config, Stage2Task
from unime_jax.training.trainer import Trainer

BACKBONES = {
    "llava_next": (llava_config, llava_tokenizer),
    "phi3_v": (phi3_v_config, phi_tokenizer),
    "llava_onevision": (onevision_config, qwen2_tokenizer),
}
SIZES = [(30, 40), (28, 28), (90, 20), (50, 23), (20, 90), (60, 60)]
TEXTS = [
    "a dog",
    "A red car parked by the old stone bridge at dusk.",
    "two cats",
    "blue",
    "a tall tree on a hill",
]


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(data=-1)


def _rows(featurizer, rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    """Half text-only rows, half image rows (with and without text), of varied lengths and grids."""
    rows = []
    for i in range(n):
        text = TEXTS[int(rng.integers(len(TEXTS)))]
        if i % 2:
            image = random_image(SIZES[int(rng.integers(len(SIZES)))], seed=i)
            rows.append(featurizer(f"<|image_1|>\n{text if i % 4 == 1 else ''}", image))
        else:
            rows.append(featurizer(text))
    for row in rows:
        row.pop(TRUNCATED)
    return rows


def _padded(model_type: str, pairs: int, seed: int):
    make_cfg, make_tokenizer = BACKBONES[model_type]
    spec, cfg = spec_for(model_type), make_cfg()
    featurizer = spec.featurizer(cfg, make_tokenizer(), max_len=24, raw=True)
    rng = np.random.default_rng(seed)
    batch = {}
    for role in ("query", "target"):
        batch |= {f"{role}_{k}": v for k, v in stack_examples(_rows(featurizer, rng, pairs)).items()}
    return spec, cfg, featurizer, batch


def _pack_spec(featurizer, mesh, chunk_tokens: int = 64) -> PackSpec:
    shards = int(np.prod([mesh.shape[a] for a in LOGICAL_RULES["batch"]]))
    # A few image classes (each is compiled), shorter than the longest row so that several are used.
    images = (*(n for n in (32, 48, 80) if n < featurizer.seq_len), featurizer.seq_len)
    classes = pack_classes(packed_lengths(24), images, chunk_tokens, max_rows=2)
    extras = tuple(k for k in featurizer.inputs.empty() if k != "pixel_values")
    return PackSpec(classes, shards, extras, tile_chunk=3)


def _trainer(spec, cfg, mesh, grad_chunks: int) -> Trainer:
    """LoRA on the LM; grad_chunks picks GradCache in the packed step (it does not chunk the padded one)."""
    model = init_model(spec, cfg, mesh, seed=1)
    lora.apply_lora(model, lora.LoRAConfig(4, 8.0, 0.0, spec.lora_targets(cfg)), nnx.Rngs(2))
    # Non-zero B matrices, so that gradients reach both adapter factors.
    for path, value in nnx.iter_graph(model):
        if len(path) > 1 and path[-2] == "lora_B" and isinstance(value, nnx.Variable):
            value[...] = 0.05 * jax.random.normal(jax.random.PRNGKey(len(path)), value.shape)
    stage = StageSection(grad_chunks=grad_chunks, layout=LayoutSection(mode="packed", tile_chunk=3))
    return Trainer(model, Stage2Task(Stage2Config(k=3)), stage, total_steps=1, mesh=mesh)


@pytest.mark.parametrize("model_type", sorted(BACKBONES))
def test_packing_keeps_every_real_token_and_tile_and_drops_the_padding(model_type, mesh):
    _, _, featurizer, padded = _padded(model_type, 8, seed=0)
    packed = pack_batch(padded, _pack_spec(featurizer, mesh))
    real = sum(int(padded[f"{r}_attention_mask"].sum()) for r in ("query", "target"))
    tiles = sum(int(padded[f"{r}_num_tiles"].sum()) for r in ("query", "target"))
    assert int(packed["packed_row_len"].sum()) == real
    assert int(np.ceil(packed["packed_tile_chunks"].sum())) * 3 >= tiles
    assert packed["packed_tokens"].size == padded["query_input_ids"].size * 2  # worst-case buffer
    assert "target_ids" not in packed and not any(k.startswith(("query_", "target_")) for k in packed)
    # Every row lands in exactly one chunk slot of a class that holds it, with its own tokens.
    slots = np.concatenate(
        [packed[k].reshape(len(packed[k]), -1) for k in packed if k.startswith("packed_plan_")], 1
    )
    for d in range(slots.shape[0]):
        used = sorted(int(s) for s in slots[d] if s >= 0)
        assert used == list(range(packed["packed_row_len"].shape[1]))
    for role in ("query", "target"):
        where = packed[f"packed_role_{role}"].reshape(-1, 2)
        for i, (d, slot) in enumerate(where):
            n = int(padded[f"{role}_attention_mask"][i].sum())
            assert packed["packed_row_len"][d, slot] == n
            start = packed["packed_row_start"][d, slot]
            np.testing.assert_array_equal(
                packed["packed_tokens"][d, start : start + n], padded[f"{role}_input_ids"][i, :n]
            )


def _packed_grads(trainer: Trainer, packed: dict, loss_fn, key: jax.Array, gradcache: bool):
    embedder = trainer.packed_embedder(trainer.frozen)
    with jax.set_mesh(trainer.mesh):
        return jax.jit(lambda p, b: embedder.value_and_grad(loss_fn, p, b, key, gradcache=gradcache))(
            trainer.params, packed
        )


@pytest.mark.parametrize("model_type", sorted(BACKBONES))
def test_packed_losses_and_gradients_equal_the_padded_batch(model_type, mesh):
    spec, cfg, featurizer, padded = _padded(model_type, 8, seed=1)
    packed = global_batch(pack_batch(padded, _pack_spec(featurizer, mesh)), mesh)
    padded = global_batch(padded, mesh)
    key = jax.random.PRNGKey(0)
    trainer = _trainer(spec, cfg, mesh, grad_chunks=1)
    loss_fn = lambda emb: trainer.task.loss(emb, padded)  # noqa: E731
    groups = trainer.task.groups(padded)
    embed = trainer.embed_fn(trainer.frozen)
    embedder = trainer.packed_embedder(trainer.frozen)
    with jax.set_mesh(mesh):
        (loss_p, _), grads_p = jax.jit(lambda p: direct_value_and_grad(embed, loss_fn, p, groups, key))(
            trainer.params
        )
        pooled = jax.jit(lambda p, b: embedder.embed_all(p, b, embedder.tile_table(p, b), key))(
            trainer.params, packed
        )
        for role, got in split_roles(pooled, packed).items():
            np.testing.assert_allclose(
                np.asarray(got), np.asarray(embed(trainer.params, groups[role], key)), atol=2e-5
            )
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_p)) > 1e-5
    for gradcache in (False, True):
        (loss, _), grads = _packed_grads(trainer, packed, loss_fn, key, gradcache)
        np.testing.assert_allclose(float(loss), float(loss_p), rtol=1e-5)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_p), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)


def test_packed_layout_refuses_a_trained_vision_tower(mesh):
    from unime_jax.runs.stages import _check_packable
    from unime_jax.training.sections import LoraSection

    spec, cfg = spec_for("llava_next"), llava_config()
    model = init_model(spec, cfg, mesh)
    packed = StageSection(layout=LayoutSection(mode="packed"))
    with pytest.raises(ValueError, match=r"stage2.layout.mode packed needs a frozen vision tower, but full"):
        _check_packable("stage2", packed, model, spec, None)
    lm_only = lora.apply_lora(model, lora.LoRAConfig(4, 8.0, 0.0, spec.lora_targets(cfg)), nnx.Rngs(0))
    _check_packable("stage2", packed, model, spec, lm_only)
    for section in (LoraSection(vision=True), LoraSection(preset="vlm2vec")):
        adapted = lora.apply_lora(
            init_model(spec, cfg, mesh),
            lora.LoRAConfig(4, 8.0, 0.0, spec.lora_targets(cfg, vision=section.vision, preset=section.preset)),
            nnx.Rngs(0),
        )
        with pytest.raises(ValueError, match=r"LoRA targets adapt it; set stage2.layout.mode: padded"):
            _check_packable("stage2", packed, model, spec, adapted)
    # Custom targets reaching past the presets: the tower's MLP is under the tower as well.
    tower_mlp = lora.LoRAConfig(4, 8.0, 0.0, r"vision_tower\..*\.mlp\.fc1")
    adapted = lora.apply_lora(init_model(spec, cfg, mesh), tower_mlp, nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"LoRA targets adapt it"):
        _check_packable("stage2", packed, model, spec, adapted)


def test_short_rows_fill_the_slots_longer_chunks_would_run_empty():
    """One 16-token row opens a 4-row chunk of class text16; three 5-token rows ride in its empty
    slots instead of opening a chunk of text8 (2 shards: the fuller shard sets how often both run)."""
    lengths = [16, 5, 5, 5, 16, 16, 5, 5]  # dealt round-robin over 2 shards after sorting by class
    ids = np.zeros((len(lengths), 16), np.int32)
    mask = (np.arange(16) < np.array(lengths)[:, None]).astype(np.int32)
    batch = {"query_input_ids": ids + 7, "query_attention_mask": mask}
    spec = PackSpec(pack_classes((8, 16), (), chunk_tokens=64, max_rows=4), shards=2)
    packed = pack_batch(batch, spec)
    # Shard 0 holds two 16-token rows and two 5-token rows, shard 1 one and three: one text16
    # chunk each, whose empty slots take every short row.
    np.testing.assert_array_equal(packed["packed_chunks_text16"], [1, 1])
    np.testing.assert_array_equal(packed["packed_chunks_text8"], [0, 0])
    for d in range(2):
        assert sorted(packed["packed_plan_text16"][d].reshape(-1)[:4]) == [0, 1, 2, 3]


def test_without_image_classes_no_tiles_travel_and_an_image_row_is_refused(mesh):
    """Text-only data: the roles' zero tile slots stay behind, so the step builds no tile table."""
    _, _, featurizer, padded = _padded("llava_next", 8, seed=2)
    text_only = PackSpec(pack_classes(packed_lengths(featurizer.seq_len), (), 64, max_rows=2), 1)
    images = {f"{r}_num_tiles" for r in ("query", "target")}
    with pytest.raises(ValueError, match=r"a image row of \d+ tokens fits no packed image class"):
        pack_batch(padded, text_only)
    no_tiles = {k: (np.zeros_like(v) if k in images else v) for k, v in padded.items()}
    packed = pack_batch(no_tiles, text_only)
    assert "packed_tiles" not in packed and "packed_tile_chunks" not in packed
    assert not any(k.endswith("pixel_values") for k in packed)

"""Training steps of both stages on a tiny LLaVA-OneVision through the real Trainer, fed by the real
pipelines: stage 1's text-only distillation and stage 2 with images, in the padded and the packed
layout. Each compiles once, its loss falls on a repeated batch, and every adapter is trained."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx
from helpers.eval_fixtures import write_images
from helpers.mmeb_train import write_subset
from helpers.nli import triplets, write_nli_csv, write_store
from helpers.onevision import onevision_config, qwen2_tokenizer

from unime_jax.backbones.llava_onevision import SPEC, TEMPLATES
from unime_jax.data.config import DataSection, LoaderSection, MmebSection, NliSection, TextSection
from unime_jax.data.nli import NliSource
from unime_jax.data.pipeline import stage1_pipeline, stage2_pipeline
from unime_jax.model_io import init_model
from unime_jax.models import lora
from unime_jax.runs.stages import pack_spec
from unime_jax.sharding import global_batch, make_mesh
from unime_jax.training.optimizer import OptimizerConfig
from unime_jax.training.sections import LayoutSection, StageSection
from unime_jax.training.tasks import Stage1Config, Stage1Task, Stage2Config, Stage2Task, Task
from unime_jax.training.trainer import Trainer

ROWS, STEPS, MAX_LEN = 8, 4, 32
LAYOUTS = {
    "padded": LayoutSection(),
    # Small chunks, so that a batch spreads over several chunks; coarse length classes (text32;
    # image32, image64, image96), each of which is compiled.
    "packed": LayoutSection(mode="packed", chunk_tokens=96, max_chunk_rows=2, tile_chunk=3, length_step=32),
}
VQA = "<|image_1|>\nRepresent the given image with the following question: {}\n"
IMAGE_TARGET = "<|image_1|>\nRepresent the given image.\n"


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(devices=jax.devices()[:2])  # batches really split, without 8 copies on 2 cores


def _section(layout: str) -> StageSection:
    optimizer = OptimizerConfig(learning_rate=3e-3, schedule="constant")
    return StageSection(batch_size=ROWS, layout=LAYOUTS[layout], optimizer=optimizer)


def _loader() -> LoaderSection:
    return LoaderSection(batch_size=ROWS, read_threads=0)


def _leaves(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}


def _train(task: Task, section: StageSection, batch: dict, mesh) -> None:
    """STEPS steps on one batch with LoRA on the LM (UniME's recipe): finite losses that fall, one
    compile, and every adapter (and nothing else) trained."""
    cfg = onevision_config()
    model = init_model(SPEC, cfg, mesh, seed=0)
    lora.apply_lora(model, lora.LoRAConfig(4, 8.0, 0.0, SPEC.lora_targets(cfg)), nnx.Rngs(1))
    trainer = Trainer(model, task, section, total_steps=STEPS, mesh=mesh)
    state = trainer.init_state(seed=0)
    before = _leaves(state.params)
    batch = global_batch(batch, mesh)
    losses = []
    for _ in range(STEPS):
        state, metrics = trainer.step(state, batch)
        assert float(metrics["finite"]) == 1.0
        losses.append(float(metrics["loss"]))
    assert trainer._step_fn._cache_size() == 1
    after = _leaves(state.params)
    assert after.keys() == before.keys() and len(before) > 0
    assert all(re.search(r"'language_model'.*'lora_[AB]'", path) for path in before), sorted(before)
    assert [path for path in before if np.array_equal(after[path], before[path])] == []
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


@pytest.fixture(scope="module")
def nli(tmp_path_factory) -> NliSection:
    tmp = tmp_path_factory.mktemp("nli")
    csv = write_nli_csv(tmp / "nli.csv", triplets(ROWS))
    write_store(tmp / "teacher", NliSource(csv), dim=16)
    return NliSection(str(csv), str(tmp / "teacher"))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_stage1_text_distillation_step(nli, mesh, layout):
    section = _section(layout)
    data = DataSection(loader=_loader(), text=TextSection(TEMPLATES.text, MAX_LEN), nli=nli)
    pack = pack_spec(section, mesh, MAX_LEN, None, ())
    batch = stage1_pipeline(data, qwen2_tokenizer(), seed=0, pack=pack).batch_at(0)
    assert ("packed_tokens" in batch) == (layout == "packed")
    _train(Stage1Task(Stage1Config()), section, batch, mesh)


@pytest.fixture(scope="module")
def mmeb(tmp_path_factory) -> MmebSection:
    """Image queries of several anyres grids (downscaled ones too) with text or image targets, and
    text queries with image targets."""
    root = tmp_path_factory.mktemp("mmeb")
    images = write_images(root, 6)
    labels = ["a dog", "a cat", "a tree", "a boat", "a car", "a house"]
    rows = [(VQA.format(f"what is it? {i}"), images[i], labels[i], "") for i in range(5)]
    rows += [(VQA.format("the same one?"), images[5], IMAGE_TARGET, images[1])]
    rows += [
        (f"Find a photo in the {weather}\n", "", IMAGE_TARGET, images[i])
        for i, weather in ((2, "rain"), (4, "fog"))
    ]
    write_subset(root, "Mixed", rows)
    return MmebSection(str(root))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_stage2_step_with_images(mmeb, mesh, layout):
    section = _section(layout)
    featurizer = SPEC.featurizer(onevision_config(), qwen2_tokenizer(), max_len=MAX_LEN, raw=True)
    pack = pack_spec(section, mesh, MAX_LEN, featurizer, ())
    data = DataSection(loader=_loader(), mmeb=mmeb)
    batch = stage2_pipeline(data, featurizer, seed=0, pack=pack).batch_at(0)
    _train(Stage2Task(Stage2Config(k=3)), section, batch, mesh)

"""`data.mmeb.image_size`: stage 2 and the negative miner resize MMEB-train images as VLM2Vec's
`process_image` does, to the pixels of images resized beforehand, and embed the same rows."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
import yaml
from helpers.eval_fixtures import write_images
from helpers.mmeb_train import write_subset
from helpers.onevision import onevision_config, qwen2_tokenizer, write_tiny_onevision
from PIL import Image

from unime_jax import mine
from unime_jax.backbones.llava_onevision import SPEC
from unime_jax.config import ConfigError, from_dict, load_config
from unime_jax.data.examples import MmebExamples
from unime_jax.data.mmeb import MmebRecord, MmebSource
from unime_jax.data.negatives import NEGATIVES_FILE, SCORES_FILE
from unime_jax.embedder import UniME
from unime_jax.models.pooling import embed
from unime_jax.runs.schema import Config
from unime_jax.runs.stages import _pipeline, load_backbone
from unime_jax.sharding import make_mesh
from unime_jax.training.tasks import Stage2Config, Stage2Task

SIZE = 36  # no fixture image has this size, so every image is resampled
MAX_LEN = 32
SUBSET = "ImageQ"
QUERY = "<|image_1|>\nRepresent the given image with the following question: what is it? {}\n"
TARGET = "<|image_1|>\nRepresent the given image.\n"


def _rows(images: list[str]) -> list[tuple[str, str, str, str]]:
    """Image queries with text targets, a text query with an image target, image to image."""
    answers = ["a dog", "a cat", "a tree", "a boat"]
    rows = [(QUERY.format(i), images[i], answers[i], "") for i in range(4)]
    rows.append(("Find a photo of a car\n", "", TARGET, images[4]))
    return [*rows, (QUERY.format(5), images[5], TARGET, images[0])]


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> tuple[Path, Path]:
    """The same records twice: images at native size (RGB, grey, palette, RGBA), and resized
    beforehand with PIL alone, as VLM2Vec's `Image.open(path).resize((n, n))`."""
    native, resized = (tmp_path_factory.mktemp(name) for name in ("native", "resized"))
    images = write_images(native, 6)
    for path in images:
        (resized / path).parent.mkdir(parents=True, exist_ok=True)
        with Image.open(native / path) as image:
            image.resize((SIZE, SIZE)).save(resized / path)  # PNG: lossless in every mode
    for root in (native, resized):
        write_subset(root, SUBSET, _rows(images))
    return native, resized


def test_image_size_is_range_checked_and_the_onevision_stage_2_config_sets_336():
    with pytest.raises(ConfigError, match=r"data\.mmeb\.image_size.*at least 1"):
        from_dict(Config, {"data": {"mmeb": {"root": "x", "image_size": 0}}})
    cfg = load_config(Path(__file__).parents[1] / "configs" / "llava_ov_stage2.yaml", (), Config)
    assert cfg.data.mmeb.image_size == 336


def _with_negative(source: MmebSource, i: int) -> MmebRecord:
    """Record i with the next record's target attached as a mined negative."""
    other = source[(i + 1) % len(source)]
    return dataclasses.replace(source[i], negatives=(other.target,), negative_target_ids=(other.target_id,))


def test_stage_2_examples_equal_those_of_images_resized_beforehand(roots):
    native, resized = roots
    featurizer = SPEC.featurizer(onevision_config(), qwen2_tokenizer(), max_len=MAX_LEN, raw=True)
    records, beforehand = MmebSource(native), MmebSource(resized)
    changed = 0
    for i in range(len(records)):
        got = MmebExamples(featurizer, native, SIZE)(_with_negative(records, i)).arrays
        want = MmebExamples(featurizer, resized)(_with_negative(beforehand, i)).arrays
        assert "negative_pixel_values" in got and got.keys() == want.keys()
        for key in got:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"record {i} {key}")
        at_native = MmebExamples(featurizer, native)(_with_negative(records, i)).arrays
        changed += any(not np.array_equal(got[key], at_native[key]) for key in got)
    assert changed == len(records)  # every record has an image, resampled to another size


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(devices=jax.devices()[:2])


def test_the_miner_embeds_the_rows_stage_2_feeds(roots, mesh, tmp_path):
    """The mining CLI's scores, and its embeddings at full precision, equal the cosines of what the
    stage-2 pipeline's batch embeds to with the same config."""
    native, _ = roots
    model_dir = write_tiny_onevision(tmp_path / "hf")
    records = len(MmebSource(native))
    tree = {
        "model": {"checkpoint": str(model_dir), "dtype": "float32"},
        "data": {
            "mmeb": {"root": str(native), "image_size": SIZE},
            "text": {"max_len": MAX_LEN},
            "loader": {"read_threads": 0},
        },
        "stage2": {"batch_size": records},
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tree))
    out = tmp_path / "mined"
    args = ["--model", str(model_dir), "--data", str(config), "--out", str(out), "--top-k", "2"]
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert mine.main([*args, "--no-progress"]) == 0, err.getvalue()

    cfg = load_config(config, (), Config)
    backbone = load_backbone(cfg, mesh)
    batch = _pipeline("stage2", cfg, backbone, cfg.stage2, mesh).batch_at(0)
    order = list(grain.MapDataset.range(records).shuffle(seed=cfg.seed))  # the pipeline's record order
    fed = {
        role: np.asarray(embed(backbone.model(**inputs), inputs["attention_mask"]))[np.argsort(order)]
        for role, inputs in Stage2Task(Stage2Config()).groups(batch).items()
    }
    model = UniME.load(model_dir, mesh=mesh, max_len=MAX_LEN, progress=False)
    mined = mine.embed_records(model, MmebSource(native), native, 4, False, SIZE)
    assert not mined.bad
    np.testing.assert_allclose(mined.queries, fed["query"], atol=1e-5)
    np.testing.assert_allclose(mined.targets, fed["target"], atol=1e-5)
    table, scores = np.load(out / NEGATIVES_FILE), np.load(out / SCORES_FILE).astype(np.float32)
    expected = np.take_along_axis(fed["query"] @ fed["target"].T, table, axis=1)
    np.testing.assert_allclose(scores, expected, atol=2e-3)  # float16 scores

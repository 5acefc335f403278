"""Explicit negatives from the data (`stage2.negatives.mode: data`): MMEB-format `neg_text`/`neg_image_path`
columns, strings (MMEB-train) or lists (UniME-V2 style), embedded like targets, missing ones masked and
counted; and a whole stage-2 run with them, from an HF source, through to its exports and their cards.
"""

from __future__ import annotations

import json
from pathlib import Path

import grain
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers.llava import write_tiny_llava
from PIL import Image

from unime_jax.cli_errors import UsageError
from unime_jax.config import from_dict
from unime_jax.data.data_negatives import MISSING, DataNegatives, check_data_negatives
from unime_jax.data.errors import DataError
from unime_jax.data.mmeb import MmebSource, TextImage
from unime_jax.runs.schema import Config
from unime_jax.runs.stages import _pipeline, load_backbone
from unime_jax.runs.train import train
from unime_jax.sharding import make_mesh
from unime_jax.training.tasks import Stage2Config, Stage2Task

skimage_data = pytest.importorskip("skimage.data")

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "coins", "clock")
IMAGE_TARGET = "<|image_1|>\nRepresent the given image."
VQA = "<|image_1|>\nRepresent the given image with the following question: "
K = 2


def _images(root: Path) -> list[str]:
    paths = []
    for i, name in enumerate(PHOTOS):
        rel = f"images/{name}.png"
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(skimage_data, name)()).convert("RGB").resize((40 + 8 * i, 32)).save(
            root / rel
        )
        paths.append(rel)
    return paths


def _write(
    root: Path, subset: str, columns: dict[str, list], types: dict[str, pa.DataType] | None = None
) -> None:
    (root / subset).mkdir(parents=True, exist_ok=True)
    fields = [pa.field(name, (types or {}).get(name, pa.string())) for name in columns]
    pq.write_table(
        pa.table(columns, schema=pa.schema(fields)), root / subset / "original-00000-of-00001.parquet"
    )


def write_fixture(root: Path) -> dict[str, list[tuple[TextImage, ...]]]:
    """Three subsets; returns each subset's expected negatives per row (k=2, MISSING-padded)."""
    photos = _images(root)
    # Caption -> image, MMEB-train's string columns: an image negative per row, two rows without one.
    captions = [f"Find me an everyday image that matches the given caption: photo {i}" for i in range(6)]
    neg_images = [photos[(i + 1) % 6] for i in range(6)]
    neg_texts = [IMAGE_TARGET] * 6
    neg_texts[2], neg_images[2] = "", ""  # empty
    neg_texts[4], neg_images[4] = None, None  # null
    _write(
        root,
        "CaptionToImage",
        {
            "qry": captions,
            "qry_image_path": [""] * 6,
            "pos_text": [IMAGE_TARGET] * 6,
            "pos_image_path": photos,
            "neg_text": neg_texts,
            "neg_image_path": neg_images,
        },
    )
    # Image question -> answer, UniME-V2-style lists: 0 to 3 text negatives, one blank.
    answers = ["an astronaut", "a cat", "coffee", "a rocket", "coins", "a clock"]
    wrong = [["a dog", "tea", "a car"], ["a dog"], [], ["   ", "a plane"], ["a clock", "stamps"], None]
    _write(
        root,
        "ImageQA",
        {
            "qry": [f"{VQA}what is this? {i}" for i in range(6)],
            "qry_image_path": photos,
            "pos_text": answers,
            "pos_image_path": [""] * 6,
            "neg_text": wrong,
            "neg_image_path": [None if w is None else [""] * len(w) for w in wrong],
        },
        {"neg_text": pa.list_(pa.string()), "neg_image_path": pa.list_(pa.string())},
    )
    # No negative columns at all.
    _write(
        root,
        "Plain",
        {
            "qry": [f"a question {i}" for i in range(4)],
            "qry_image_path": [""] * 4,
            "pos_text": [f"an answer {i}" for i in range(4)],
            "pos_image_path": [""] * 4,
        },
    )

    def pad(found: list[TextImage]) -> tuple[TextImage, ...]:
        return (*found[:K], *[MISSING] * (K - len(found[:K])))

    return {
        "CaptionToImage": [
            pad([TextImage(IMAGE_TARGET, neg_images[i])] if neg_texts[i] else []) for i in range(6)
        ],
        "ImageQA": [
            pad([TextImage("a dog", ""), TextImage("tea", "")]),
            pad([TextImage("a dog", "")]),
            pad([]),
            pad([TextImage("a plane", "")]),
            pad([TextImage("a clock", ""), TextImage("stamps", "")]),
            pad([]),
        ],
        "Plain": [pad([])] * 4,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("data_negatives")
    root = tmp / "mmeb"
    expected = write_fixture(root)
    source = MmebSource(root, subsets=("CaptionToImage", "ImageQA", "Plain"))
    negatives = [expected[source[i].subset][source[i].row] for i in range(len(source))]
    hf = write_tiny_llava(tmp / "source")
    (hf / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- vision\n---\n# A tiny source model\n")
    return {"tmp": tmp, "root": root, "source": source, "negatives": negatives, "hf": hf}


def config_tree(world: dict, mode: str = "data", **stage2) -> dict:
    return {
        "stages": ["stage2"],
        "workdir": str(world["tmp"] / "run"),
        "model": {"checkpoint": str(world["hf"]), "dtype": "float32"},
        "data": {
            "mmeb": {"root": str(world["root"]), "subsets": ["CaptionToImage", "ImageQA", "Plain"]},
            "text": {"max_len": 32},
            "loader": {"read_threads": 0},
        },
        "stage2": {
            "steps": 2,
            "batch_size": 8,
            "save_every": 2,
            "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0},
            "loss": {"k": 2},
            "negatives": {"mode": mode, "k": K},
            **stage2,
        },
        "export": {"base_model": "example-org/tiny-llava-next"},
        "metrics": {"wandb": {"project": "unime-tests", "mode": "offline"}},
    }


def test_records_get_the_first_k_negatives_with_a_text(world) -> None:
    attach = DataNegatives(K)
    for i, want in enumerate(world["negatives"]):
        assert attach(world["source"][i]).negatives == want, world["source"][i]


def test_batches_carry_data_negatives_like_targets_and_count_the_missing(world) -> None:
    cfg = from_dict(Config, config_tree(world))
    mesh = make_mesh(devices=jax.devices()[:2])
    backbone = load_backbone(cfg, mesh)
    pipeline = _pipeline("stage2", cfg, backbone, cfg.stage2, mesh)
    featurizer = backbone.spec.featurizer(backbone.config, backbone.tokenizer, max_len=32, raw=True)
    iterator = iter(pipeline)
    order = list(grain.MapDataset.range(len(world["source"])).shuffle(seed=cfg.seed))
    missing = 0
    for step in range(pipeline.batches_per_epoch):
        batch = next(iterator)
        assert batch["negative_input_ids"].shape[:2] == (8, K) and "mined_target_ids" not in batch
        for row, index in enumerate(order[8 * step : 8 * step + 8]):
            record, want = world["source"][index], world["negatives"][index]
            np.testing.assert_array_equal(batch["valid_negatives"][row], [n != MISSING for n in want])
            missing += sum(n == MISSING for n in want)
            for j, negative in enumerate(want):
                image = record.target if negative == MISSING else negative  # a missing slot holds the target
                pixels = Image.open(world["root"] / image.image_path) if image.image_path else None
                features = featurizer(image.text, pixels)
                np.testing.assert_array_equal(batch["negative_input_ids"][row, j], features["input_ids"])
                np.testing.assert_array_equal(
                    batch["negative_pixel_values"][row, j], features["pixel_values"]
                )
    counts = iterator.total_counts()
    assert counts.missing_negatives == missing > 0 and counts.num_skipped == 0
    assert counts.metrics()["data/missing_negatives"] == missing
    assert f"{missing} negative slots empty" in iterator.summary()


def test_missing_negatives_are_neither_negatives_nor_candidates() -> None:
    rng = np.random.default_rng(0)
    q, c = rng.normal(size=(2, 4, 8)).astype(np.float32)
    extra = rng.normal(size=(4, 2, 8)).astype(np.float32)
    valid = np.array([[True, True], [True, False], [False, False], [False, True]])
    cfg = Stage2Config(k=2, beta=10.0)
    embeddings = {"query": q, "target": c, "negative": extra.reshape(8, 8)}
    loss, metrics = Stage2Task(cfg, in_batch=False).loss(embeddings, {"valid_negatives": valid})
    qn, cn, en = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (q, c, extra))
    pos, neg = np.sum(qn * cn, -1) / cfg.tau, np.einsum("bd,bmd->bm", qn, en) / cfg.tau
    per_row = [np.log(np.exp(pos[i]) + np.exp(neg[i][valid[i]]).sum()) - pos[i] for i in range(4)]
    np.testing.assert_allclose(float(loss), np.mean(per_row), rtol=1e-5)  # row 2 has only its positive: 0
    # With a β low enough to filter every candidate, only the 4 + 3*4 present ones are counted.
    _, filtered = Stage2Task(Stage2Config(k=2, beta=-10.0)).loss(embeddings, {"valid_negatives": valid})
    assert float(filtered["false_neg_frac"]) == pytest.approx(1.0)
    assert float(metrics["false_neg_frac"]) == 0.0


def test_data_modes_need_data_with_negative_columns(world, tmp_path) -> None:
    tree = config_tree(world) | {"workdir": str(tmp_path / "run")}
    tree["data"]["mmeb"]["subsets"] = ["Plain"]
    tree["stage2"]["batch_size"] = 4
    tree["metrics"] = {}
    with pytest.raises(
        UsageError, match=r"stage2\.negatives\.mode=data asks for the data's negatives.*Plain"
    ):
        train(from_dict(Config, tree))  # before any model loads
    bad = tmp_path / "mmeb"
    _write(bad, "Bad", {"qry": ["q"], "qry_image_path": [""], "pos_text": ["t"], "pos_image_path": [""], "neg_text": [3]},
           {"neg_text": pa.int64()})  # fmt: skip
    source = MmebSource(bad)
    wrong_type = r"Bad/original-00000-of-00001\.parquet: column 'neg_text' holds int64"
    with pytest.raises(DataError, match=wrong_type):
        DataNegatives(1)(source[0])
    with pytest.raises(DataError, match=wrong_type):
        check_data_negatives(source)  # the run's preflight: before training, not in a loader worker
    (bad / "Bad" / "original-00000-of-00001.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match=r"cannot read MMEB parquet file .*Bad/original-00000-of-00001\.parquet"):
        check_data_negatives(source)
    with pytest.raises(ValueError, match="in_batch takes none, and neither do data and in_batch_data"):
        from_dict(Config, {"stage2": {"negatives": {"mode": "data", "dir": "x"}}})


@pytest.fixture(scope="module")
def trained(world) -> dict:
    """Stage 2 with the data's negatives and the batch's top-k, LoRA, W&B offline and a profile window."""
    tree = config_tree(world, mode="in_batch_data", profile={"start_step": 2, "num_steps": 1})
    outcome = train(from_dict(Config, tree))
    return {"workdir": Path(tree["workdir"]), "outcome": outcome}


def test_stage2_trains_with_data_negatives(trained) -> None:
    workdir = trained["workdir"]
    rows = [json.loads(line) for line in (workdir / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert rows[-1]["data/missing_negatives"] > 0 and rows[-1]["data/skipped"] == 0
    assert (workdir / "stage2" / "merged").is_dir()
    (trace,) = (workdir / "stage2" / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb")
    assert trace.stat().st_size > 0
    (wandb_run,) = (workdir / "stage2" / "wandb").glob("offline-run-*")
    run_id = (workdir / "stage2" / "wandb" / "run_id").read_text().strip()
    log = (wandb_run / f"run-{run_id}.wandb").read_bytes()
    assert b"stage2/data/missing_negatives" in log and b"in_batch_data" in log  # the metrics and the config


def test_exports_carry_model_cards(trained, world) -> None:
    workdir = trained["workdir"]
    assert trained["outcome"].exported == [
        str(workdir / "export" / d) for d in ("hf", "peft_base_hf", "peft")
    ]
    for export, library in (("hf", "transformers"), ("peft", "peft")):
        text = (workdir / "export" / export / "README.md").read_text()
        _, header, body = text.split("---\n", 2)
        meta = yaml.safe_load(header)
        assert meta["base_model"] == "example-org/tiny-llava-next"
        assert meta["library_name"] == library and meta["pipeline_tag"] == "feature-extraction"
        assert meta["license"] == "apache-2.0"  # the source's README.md says so
        assert {"unime", "unime-jax", "llava_next"} <= set(meta["tags"])
        assert "| stage2 | 2 | 8 |" in body and "in_batch_data (k=2)" in body
        assert "CaptionToImage, ImageQA, Plain" in body and "This run evaluated nothing" in body
        assert (
            "UniME.load(" in body and "transformers.LlavaNextForConditionalGeneration.from_pretrained" in body
        )
    assert (
        "PeftModel.from_pretrained(base, adapter)" in (workdir / "export" / "peft" / "README.md").read_text()
    )
    assert (
        "lora"
        in yaml.safe_load((workdir / "export" / "peft" / "README.md").read_text().split("---\n")[1])["tags"]
    )

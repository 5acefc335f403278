"""`python -m unime_jax.mine` on a tiny LLaVA-NeXT and MMEB parquet files, and stage 2 with its table:
top-k against a brute-force numpy ranking of independently computed embeddings, manifest checks on
the training side, mined batches and a short stage-2 run."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
import yaml
from PIL import Image

from unime_jax import mine
from unime_jax.config import ConfigError, from_dict
from unime_jax.config import load_config as _load_config
from unime_jax.data.errors import DataError
from unime_jax.data.mmeb import MmebSource
from unime_jax.data.negatives import (
    MANIFEST_FILE,
    NEGATIVES_FILE,
    SCORES_FILE,
    open_mined,
    read_mined_manifest,
    table_sha256,
)
from unime_jax.embedder import UniME
from unime_jax.model_io import save_model
from unime_jax.runs.schema import Config
from unime_jax.runs.stages import _pipeline, load_backbone, run_stage
from unime_jax.sharding import make_mesh
from unime_jax.training.checkpoints import CheckpointMismatchError
from unime_jax.training.sections import NegativesSection
from unime_jax.training.tasks import Stage2Config, Stage2Task

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

LLAVA = {
    "model_type": "llava_next",
    "image_token_index": 32000,
    "image_grid_pinpoints": [[28, 56], [56, 28], [56, 56]],
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 28,
        "patch_size": 7,
    },
    "text_config": {
        "model_type": "mistral",
        "vocab_size": 32064,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "sliding_window": None,
    },
}
K = 6
VQA = "<|image_1|>\nWhat is shown in the picture? "
FALSE_NEGATIVE = (2, 3)  # record 3's target is record 2's query text: S_23 ≈ 1
SAME_TARGET = (0, 1)  # both targets are "Yes"
MISSING, TOO_LONG = 10 + 4, 10 + 6  # ImageQ rows: a missing image; a text too long for an image row
BAD = (MISSING, TOO_LONG)
RECORDS = 17
TEXT_ROWS = [
    ("Is the sky blue on a clear day?", "Yes"),
    ("Is water wet?", "Yes"),
    ("a red bicycle leaning against a brick wall", "a bicycle parked in the street"),
    ("Find the caption of a photo of transport", "a red bicycle leaning against a brick wall"),
    ("What do cats like to chase?", "mice and small balls of wool"),
    ("Name a fruit that is yellow", "a banana"),
    ("Where do penguins live?", "in the cold southern hemisphere"),
    ("What is the capital of France?", "Paris is the capital city"),
    ("How many legs does a spider have?", "eight legs"),
    ("Which instrument has 88 keys?", "the piano, a keyboard instrument"),
]
SIZES = [(30, 40), (28, 28), (60, 20), (20, 60), (40, 40)]


def write_parquet(root: Path, subset: str, rows: list[tuple[str, str, str, str]]) -> None:
    columns = zip(*rows, strict=True)
    names = ("qry", "qry_image_path", "pos_text", "pos_image_path")
    (root / subset).mkdir(parents=True, exist_ok=True)
    table = pa.table({name: list(values) for name, values in zip(names, columns, strict=True)})
    pq.write_table(table, root / subset / "original-00000-of-00001.parquet")


def write_mmeb(root: Path) -> Path:
    """TextRet: 10 text pairs (a duplicate target, a false negative); ImageQ: 7 image queries, two bad."""
    images = []
    for i, size in enumerate(SIZES):
        pixels = np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)
        images.append(f"images/img{i}.png")
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / images[-1])
    write_parquet(root, "TextRet", [(q, "", t, "") for q, t in TEXT_ROWS])
    answers = ["a dog", "a cat", "a tree", "a car", "a boat", ""]
    image_rows = [(f"{VQA}{i}", images[i % len(images)], answers[i], "") for i in range(6)]
    image_rows[4] = (image_rows[4][0], "images/missing.png", "a car", "")
    image_rows[5] = (image_rows[5][0], images[4], "<|image_1|>\nRepresent the given image.", images[0])
    image_rows.append((VQA + "describe every detail " * 60, images[1], "a long answer", ""))
    write_parquet(root, "ImageQ", image_rows)
    return root


def config_tree(root: Path) -> dict:
    return {
        "stages": ["stage2"],
        "model": {"init": LLAVA, "tokenizer": "mistral-common", "dtype": "float32"},
        "data": {
            "mmeb": {"root": str(root), "subsets": ["TextRet", "ImageQ"]},
            "text": {"max_len": 32},
            "loader": {"batch_size": 4, "read_threads": 0, "max_bad_fraction": 0.2},
        },
        "stage2": {
            "steps": 1,
            "batch_size": 4,
            "save_every": 1,
            "lora": {"enabled": False},
            "loss": {"k": 2},
        },
    }


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(devices=jax.devices()[:2])  # batches really split, without 8 copies on 2 cores


@pytest.fixture(scope="module")
def world(tmp_path_factory, mesh) -> dict:
    """The data, its config file, and the tiny model saved with its tokenizer."""
    tmp = tmp_path_factory.mktemp("mine")
    root = write_mmeb(tmp / "mmeb")
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump(config_tree(root)))
    cfg = _load_config(config, (), Config)
    backbone = load_backbone(cfg, mesh)
    model_dir = tmp / "model"
    save_model(model_dir, backbone.model, backbone.model_type, backbone.config)
    backbone.tokenizer.save_pretrained(model_dir)
    return {"tmp": tmp, "root": root, "config": config, "model": model_dir, "cfg": cfg}


@pytest.fixture(scope="module")
def reference(world, mesh) -> dict:
    """Embeddings of every good record's query and target, computed here with UniME.encode."""
    source = MmebSource(world["root"], subsets=("TextRet", "ImageQ"))
    model = UniME.load(world["model"], mesh=mesh, max_len=32)
    good = np.array([i not in BAD for i in range(len(source))])
    sides = [side for i in np.flatnonzero(good) for side in (source[i].query, source[i].target)]
    out = model.encode(
        texts=[s.text for s in sides],
        images=[world["root"] / s.image_path if s.image_path else None for s in sides],
        raw=True,
        batch_size=8,
    )
    queries, targets = np.zeros((2, len(source), model.dim), np.float32)
    queries[good], targets[good] = out[0::2], out[1::2]
    sims = queries.astype(np.float64) @ targets.T.astype(np.float64)
    i = FALSE_NEGATIVE[0]
    beta = float((1 - sims[i, i]) / 2)  # S_23 ≈ 1 > S_22 + β: the constructed false negative is dropped
    return {
        "source": source,
        "good": good,
        "queries": queries,
        "targets": targets,
        "sims": sims,
        "beta": beta,
    }


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = mine.main(list(args))
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def mined(world, reference) -> Path:
    out = world["tmp"] / "mined"
    beta = f"stage2.loss.beta={reference['beta']}"
    args = ["--model", str(world["model"]), "--data", str(world["config"]), "--out", str(out), "--set", beta]
    status, stdout, stderr = run_cli(*args, "--top-k", str(K), "--batch-size", "8", "--no-progress")
    assert status == 0, stderr
    parquet = world["root"] / "ImageQ" / "original-00000-of-00001.parquet"
    assert f"bad record {MISSING} (missing_image): {parquet} row 4 (ImageQ) qry: " in stderr
    assert f"bad record {TOO_LONG} (unembeddable): {parquet} row 6 (ImageQ) qry: " in stderr
    assert "inputs with images are not truncated" in stderr and "2 of 17 records cannot be embedded" in stderr
    assert f"wrote {out}" in stdout
    return out


def brute_force(
    sims: np.ndarray, ids: np.ndarray, good: np.ndarray, pool: np.ndarray, beta: float
) -> np.ndarray:
    """The miner's rules, one row at a time."""
    table = np.full((len(ids), K), -1)
    for i in np.flatnonzero(good):
        first = {}  # target id -> its first good record in i's pool
        for j in range(len(ids)):
            if good[j] and pool[j] == pool[i]:
                first.setdefault(ids[j], j)
        candidates = [j for target, j in first.items() if target != ids[i]]
        valid = [j for j in candidates if sims[i, j] <= sims[i, i] + beta]
        ranked = sorted(valid or candidates, key=lambda j: -sims[i, j])[:K]
        table[i] = [ranked[r % len(ranked)] for r in range(K)]
    return table


def test_table_is_the_brute_force_top_k(mined, reference) -> None:
    source, sims, good, beta = reference["source"], reference["sims"], reference["good"], reference["beta"]
    ids = source.target_ids
    assert ids[SAME_TARGET[0]] == ids[SAME_TARGET[1]]
    table = np.load(mined / NEGATIVES_FILE, mmap_mode="r")
    scores = np.load(mined / SCORES_FILE)
    assert table.dtype == np.int32 and table.shape == (RECORDS, K) and scores.dtype == np.float16
    subset = np.array([0] * 10 + [1] * 7)
    expected = brute_force(sims, ids, good, subset, beta)
    np.testing.assert_array_equal(table, expected)
    rows = np.flatnonzero(good)
    np.testing.assert_allclose(scores[rows], sims[rows[:, None], table[rows]], atol=2e-3)
    assert np.isnan(scores[list(BAD)]).all()
    # The constructed false negative is row 2's most similar candidate, yet dropped by β.
    i, j = FALSE_NEGATIVE
    assert sims[i, j] > 0.99 and sims[i, j] > sims[i, i] + beta and j not in table[i]
    assert sims[i, j] == max(sims[i, c] for c in range(10) if c != i)
    # Own and identical targets are never negatives; the bad record is in no row and has none.
    assert all(r not in table[r] for r in range(RECORDS))
    assert SAME_TARGET[1] not in table[SAME_TARGET[0]] and SAME_TARGET[0] not in table[SAME_TARGET[1]]
    # A target shared by several records is one candidate (its first record), not several copies.
    assert all(SAME_TARGET[1] not in row for row in table) and SAME_TARGET[0] in table
    assert (table[list(BAD)] == -1).all() and not set(BAD) & set(table.ravel())
    # ImageQ has at most 4 candidates per good row, fewer than K: they repeat in order.
    for i in (10, 11, 12, 13, 15):
        n = len(set(table[i]))
        assert n <= 4 and list(table[i]) == [table[i][r % n] for r in range(K)]

    manifest = read_mined_manifest(mined)
    assert (manifest.records, manifest.k, manifest.beta) == (RECORDS, K, beta)
    assert manifest.subsets == ("TextRet", "ImageQ") and manifest.split == "original"
    assert manifest.source_sha256 == source.sha256 and manifest.table_sha256 == table_sha256(table)
    assert manifest.image_size is None  # native size
    assert manifest.counts["bad_records"] == 2 and manifest.counts["rows_unmined"] == 2
    padded = sum(len(set(expected[i])) < K for i in rows)
    assert padded >= 5 and manifest.counts["rows_padded"] == padded
    assert manifest.counts["false_negatives_filtered"] >= 1
    assert [b["index"] for b in manifest.bad_records] == list(BAD)
    assert [b["reason"] for b in manifest.bad_records] == ["missing_image", "unembeddable"]
    assert not list(mined.parent.glob(".mined.*"))  # no temporary directory left behind


def test_across_subsets_and_beta_fallback(reference) -> None:
    source, sims, good = reference["source"], reference["sims"], reference["good"]
    bad = [mine.BadRecord(i, "x", "") for i in BAD]
    embeddings = mine.Embeddings(reference["queries"], reference["targets"], bad)
    pools = mine.candidate_pools(source, across_subsets=True)
    got = mine.mine(embeddings, source.target_ids, pools, K, reference["beta"], 3, progress=False)
    expected = brute_force(sims, source.target_ids, good, np.zeros(RECORDS), reference["beta"])
    np.testing.assert_array_equal(got.negatives, expected)
    # β = -2 drops every candidate: each row falls back to its hardest ones, ignoring β.
    got = mine.mine(embeddings, source.target_ids, pools, K, -2.0, 5, progress=False)
    np.testing.assert_array_equal(
        got.negatives, brute_force(sims, source.target_ids, good, np.zeros(RECORDS), -2.0)
    )
    assert got.counts["rows_without_valid_candidate"] == got.counts["rows_mined"] == RECORDS - 2


def test_training_refuses_a_table_of_other_data(world, mined, mesh) -> None:
    with pytest.raises(
        DataError,
        match=r"(?s)manifest\.json were mined for other data.*records: table 17, configured source 10.*subsets.*python -m unime_jax\.mine",
    ):
        open_mined(mined, MmebSource(world["root"], subsets=("TextRet",)), 2, None)
    both = MmebSource(world["root"], subsets=("TextRet", "ImageQ"))
    with pytest.raises(DataError, match="holds 6 negatives per record; lower k or mine again with --top-k 8"):
        open_mined(mined, both, 8, None)
    # Mined at native size: a run that resizes its images (data.mmeb.image_size) ranks other pixels.
    with pytest.raises(DataError, match=r"(?s)mined for other data.*image_size: table None, configured source 336"):
        open_mined(mined, both, 2, 336)
    # Same subsets and record count, one target changed: only the checksum tells.
    changed = world["tmp"] / "changed"
    shutil.copytree(world["root"], changed)
    rows = [(q, "", t.replace("eight", "8"), "") for q, t in TEXT_ROWS]
    write_parquet(changed, "TextRet", rows)
    cfg = config_for(world, mined, "mined", root=str(changed))
    backbone = load_backbone(cfg, mesh)
    with pytest.raises(DataError, match=r"(?s)mined/manifest\.json were mined for other data.*source_sha256"):
        _pipeline("stage2", cfg, backbone, cfg.stage2, mesh)


def config_for(world: dict, table: Path, mode: str, root: str | None = None) -> Config:
    tree = config_tree(Path(root or world["root"]))
    tree["model"] = {"checkpoint": str(world["model"]), "dtype": "float32"}
    tree["stage2"]["negatives"] = {"mode": mode, "dir": str(table), "k": 2}
    return from_dict(Config, tree)


def test_mined_batches_carry_the_table(world, mined, mesh) -> None:
    cfg = config_for(world, mined, "mined")
    backbone = load_backbone(cfg, mesh)
    pipeline = _pipeline("stage2", cfg, backbone, cfg.stage2, mesh)
    table = np.load(mined / NEGATIVES_FILE)
    ids = MmebSource(world["root"], subsets=("TextRet", "ImageQ")).target_ids
    order = list(grain.MapDataset.range(RECORDS).shuffle(seed=cfg.seed))  # the pipeline's record order
    checked = 0
    for step in range(pipeline.batches_per_epoch):
        batch = pipeline.batch_at(step)
        seq = batch["query_input_ids"].shape[1]
        assert batch["negative_input_ids"].shape == (4, 2, seq)
        assert batch["negative_pixel_values"].shape[:2] == (4, 2)
        assert batch["negative_image_sizes"].shape == (4, 2, 2)
        for row, index in enumerate(order[4 * step : 4 * step + 4]):
            if index not in BAD:  # a bad record's slot holds a replacement
                np.testing.assert_array_equal(batch["mined_target_ids"][row], ids[table[index, :2]])
                checked += 1
    assert checked == sum(i not in BAD for i in order[: 4 * pipeline.batches_per_epoch]) >= 14


def test_stage2_run_with_both_and_resume_refuses_another_table(world, mined, mesh) -> None:
    cfg = config_for(world, mined, "both")
    workdir = world["tmp"] / "run" / "stage2"
    result = run_stage("stage2", load_backbone(cfg, mesh), cfg, mesh, workdir)
    assert len(result.history) == 1 and np.isfinite(result.history[0]["loss"])
    assert result.history[0]["loss"] > 0

    # Another table for the same data: a resumed run must not silently switch to it.
    other = world["tmp"] / "mined_other"
    shutil.copytree(mined, other)
    table = np.roll(np.load(other / NEGATIVES_FILE), 1, axis=1)
    np.save(other / NEGATIVES_FILE, table)
    manifest = json.loads((other / MANIFEST_FILE).read_text())
    (other / MANIFEST_FILE).write_text(json.dumps(manifest | {"table_sha256": table_sha256(table)}))
    shutil.rmtree(workdir / "merged")  # unfinished again: the next run resumes from the checkpoint
    section = dataclasses.replace(cfg.stage2, negatives=NegativesSection("both", str(other), 2))
    with pytest.raises(CheckpointMismatchError, match="negatives"):
        run_stage("stage2", load_backbone(cfg, mesh), cfg, mesh, workdir, section)


def test_help_and_usage_errors(world, tmp_path) -> None:
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stdout(io.StringIO()) as out:
        mine.main(["--help"])
    assert (
        exit_info.value.code == 0
        and "negatives.npy" in out.getvalue()
        and "--across-subsets" in out.getvalue()
    )
    base = ["--data", str(world["config"]), "--out", str(tmp_path / "out")]
    status, _, err = run_cli("--model", str(tmp_path / "nowhere"), *base)
    assert status == 2 and f"model directory {tmp_path / 'nowhere'} does not exist" in err
    status, _, err = run_cli("--model", str(world["model"]), *base, "--set", "data.mmeb=null")
    assert status == 2 and "data.mmeb section" in err
    status, _, err = run_cli("--model", str(tmp_path), *base)
    assert status == 2 and "neither a unime-jax checkpoint" in err
    (tmp_path / "out").mkdir()
    status, _, err = run_cli("--model", str(world["model"]), *base)
    assert status == 2 and "exists; pass --overwrite" in err
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()):
        mine.main(["--model", str(world["model"]), *base, "--top-k", "0"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "out" / NEGATIVES_FILE).exists()


def test_negatives_section_and_mined_only_loss() -> None:
    with pytest.raises(ConfigError, match="modes mined and both need dir"):
        from_dict(Config, {"stage2": {"negatives": {"mode": "mined"}}})
    with pytest.raises(ConfigError, match="in_batch takes none"):
        from_dict(Config, {"stage2": {"negatives": {"dir": "x"}}})
    rng = np.random.default_rng(0)
    q, c = rng.normal(size=(2, 4, 8)).astype(np.float32)
    extra = rng.normal(size=(4, 2, 8)).astype(np.float32)
    embeddings = {"query": q, "target": c, "negative": extra.reshape(8, 8)}
    cfg = Stage2Config(k=2, beta=10.0)
    loss, _ = Stage2Task(cfg, in_batch=False).loss(embeddings, {})
    # Mined only: each row's softmax is over its positive and its own two mined negatives.
    qn, cn, en = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (q, c, extra))
    logits = np.concatenate([np.sum(qn * cn, -1)[:, None], np.einsum("bd,bmd->bm", qn, en)], 1) / cfg.tau
    expected = np.mean(np.log(np.exp(logits).sum(1)) - logits[:, 0])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    both, _ = Stage2Task(cfg).loss(embeddings, {})
    assert float(both) > float(loss)  # two in-batch negatives more in every denominator


def test_too_many_bad_records_stop_before_writing(world, tmp_path) -> None:
    out = tmp_path / "out"
    config = ["--data", str(world["config"]), "--set", "data.mmeb.subsets=[ImageQ]"]
    config += ["--set", "data.mmeb.max_per_subset=5", "--set", "data.loader.max_bad_fraction=0.1"]
    status, _, err = run_cli("--model", str(world["model"]), *config, "--out", str(out), "--no-progress")
    assert status == 1 and "1 of 5 records cannot be embedded" in err and "max_bad_fraction=0.1" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_records_are_said_to_be_in_the_manifest_only_once_it_is_written(world, tmp_path) -> None:
    bad = [mine.BadRecord(i, "missing_image", f"data.parquet row {i}") for i in range(25)]
    with contextlib.redirect_stderr(io.StringIO()) as err:
        mine._report_bad(bad, 30)  # printed before the run knows whether it will write anything
    assert "... and 5 more\n" in err.getvalue() and "manifest" not in err.getvalue()


def test_a_top_k_above_every_candidate_pool_is_warned(world, reference, tmp_path) -> None:
    beta = f"stage2.loss.beta={reference['beta']}"
    args = ["--model", str(world["model"]), "--data", str(world["config"]), "--set", beta, "--no-progress"]
    # Resized images (as data.mmeb.image_size feeds them to stage 2) are recorded in the manifest.
    args += ["--set", "data.mmeb.image_size=56"]
    status, _, err = run_cli(*args, "--out", str(tmp_path / "wide"), "--top-k", "40", "--batch-size", "8")
    assert status == 0, err
    assert "warning: --top-k 40 is more than the 8 distinct other targets of the largest candidate pool" in err
    assert f"all 2 bad records are listed in {tmp_path / 'wide' / MANIFEST_FILE}" in err
    assert read_mined_manifest(tmp_path / "wide").image_size == 56

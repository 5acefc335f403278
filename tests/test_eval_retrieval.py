"""`python -m unime_jax.eval retrieval`: every dataset in its published format, metrics against numpy
over `UniME.encode`, SugarCrepe, bad records."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.eval_fixtures import write_images
from helpers.llava import write_tiny_llava
from PIL import Image

from unime_jax import UniME
from unime_jax.eval import retrieval_data
from unime_jax.eval.cli import main
from unime_jax.eval.retrieval_data import SUGARCREPE_SUBSETS
from unime_jax.eval.retrieval_suite import pair_metrics
from unime_jax.sharding import make_mesh

CAPTIONS = [["a red circle", "a round red thing"], ["two blue squares"], ["a cat on a mat", "a cat", "mat and cat"],
            ["the sea at night"], ["green fields", "a field"], ["an old car"]]  # fmt: skip


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return write_tiny_llava(tmp_path_factory.mktemp("retrieval") / "hf")


@pytest.fixture(scope="module")
def unime(hf_dir) -> UniME:
    return UniME.load(hf_dir, mesh=make_mesh(devices=jax.devices()[:2]), progress=False)


def _png_bytes(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """One small set in each published format."""
    root = tmp_path_factory.mktemp("sources")
    images = write_images(root, 8, seed=3)
    pairs = root / "pairs.jsonl"
    lines = [json.dumps({"image": images[i], "captions": c}) for i, c in enumerate(CAPTIONS)]
    pairs.write_text(
        "\n".join([*lines, "", "not json", json.dumps({"image": "images/missing.png", "captions": ["x"]})])
    )
    # royokong/{flickr30k,coco}_test: parquet with image structs holding the file bytes
    for name, count in (("flickr", 2), ("coco", 6)):
        records = [{"image": {"bytes": _png_bytes(root / images[i]), "path": None},
                    "text": [f"{name} caption {i}.{k}" for k in range(count)]} for i in range(5)]  # fmt: skip
        (root / name / "data").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(records), root / name / "data" / "test-00000-of-00001.parquet")
    records = [{"id": i, "image": images[i], "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                {"from": "gpt", "value": f"A long\ncaption {i}."}]} for i in range(5)]  # fmt: skip
    (root / "share4v.json").write_text(json.dumps(records))
    for i in range(4):
        (root / "urban" / "image").mkdir(parents=True, exist_ok=True)
        (root / "urban" / "caption").mkdir(exist_ok=True)
        Image.open(root / images[i]).convert("RGB").save(root / "urban" / "image" / f"u{i}.jpg")
        (root / "urban" / "caption" / f"u{i}.txt").write_text(f"An urban scene {i}.\nsecond line")
    (root / "sugar").mkdir()
    for k, subset in enumerate(SUGARCREPE_SUBSETS):
        records = {str(i): {"filename": Path(images[(i + k) % 8]).name, "caption": f"true {subset} {i}",
                            "negative_caption": f"false {subset} {i}"} for i in range(3)}  # fmt: skip
        (root / "sugar" / f"{subset}.json").write_text(json.dumps(records))
    return {"root": root, "pairs": pairs}


@pytest.fixture(scope="module")
def run(hf_dir, sources, tmp_path_factory) -> Path:
    root, out = sources["root"], tmp_path_factory.mktemp("out")
    args = ["retrieval", "--model", str(hf_dir), "--out", str(out), "--no-progress", "--pairs", str(sources["pairs"]),
            "--flickr30k", str(root / "flickr"), "--coco", str(root / "coco"),
            "--sharegpt4v", str(root / "share4v.json"), "--sharegpt4v-images", str(root),
            "--urban1k", str(root / "urban"), "--sugarcrepe", str(root / "sugar"),
            "--sugarcrepe-images", str(root / "images"), "--compare", "unime-llava16"]  # fmt: skip
    assert main(args) == 0
    return out


def _recall(sim: np.ndarray, gold: list[set[int]], k: int) -> float:
    """Plain numpy: a query hits when one of its gold candidates is among its k highest scores."""
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return float(np.mean([bool(set(row) & g) for row, g in zip(top, gold, strict=True)]))


def test_pairs_recall_is_numpys_over_unime_encode(run, unime, sources):
    root = sources["root"]
    image_emb = unime.encode(images=[root / f"images/{i:03d}.png" for i in range(len(CAPTIONS))])
    captions = [c for group in CAPTIONS for c in group]
    owner = [i for i, group in enumerate(CAPTIONS) for _ in group]
    caption_emb = unime.encode(texts=captions)
    sim = caption_emb.astype(np.float64) @ image_emb.T
    score = json.loads((run / "pairs_score.json").read_text())
    for k in (1, 5, 10):
        assert score[f"t2i_r{k}"] == pytest.approx(_recall(sim, [{o} for o in owner], k), abs=1e-12)
        by_image = [{j for j, o in enumerate(owner) if o == i} for i in range(len(CAPTIONS))]
        assert score[f"i2t_r{k}"] == pytest.approx(_recall(sim.T, by_image, k), abs=1e-12)
    assert 0 < score["t2i_r1"] < 1 and score["t2i_r10"] == 1.0  # neither trivial nor broken
    # the malformed line and the missing image are left out and counted
    assert (score["num_images"], score["num_captions"], score["num_skipped"]) == (6, 10, 2)


def test_each_published_format_is_read(sources):
    root = sources["root"]
    flickr = retrieval_data.read_hf_parquet(root / "flickr", "flickr30k")
    assert len(flickr.images) == 5 and flickr.caption_image == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert Image.open(io.BytesIO(flickr.images[2]())).size == Image.open(root / "images/002.png").size
    coco = retrieval_data.read_hf_parquet(root / "coco", "coco", max_captions=5)
    assert len(coco.captions) == 25 and coco.captions[:2] == ["coco caption 0.0", "coco caption 0.1"]
    share = retrieval_data.read_sharegpt4v(root / "share4v.json", root, limit=3)
    assert share.captions == ["A long caption 0.", "A long caption 1.", "A long caption 2."]
    assert share.images[1] == root / "images/001.png"
    urban = retrieval_data.read_urban1k(root / "urban")
    assert urban.captions[0] == "An urban scene 0.\n" and urban.images[3] == root / "urban/image/u3.jpg"
    sugar = retrieval_data.read_sugarcrepe(root / "sugar", root / "images")
    assert [s.name for s in sugar] == list(SUGARCREPE_SUBSETS) and sugar[0].negatives[
        1
    ] == "false replace_obj 1"


def test_the_cli_scores_every_dataset_and_summarises(run):
    summary = json.loads((run / "retrieval_summary.json").read_text())
    assert set(summary) == {"pairs", "flickr30k", "coco", "sharegpt4v", "urban1k", "sugarcrepe"}
    coco = json.loads((run / "coco_score.json").read_text())
    assert (coco["num_images"], coco["num_captions"]) == (5, 25)
    assert summary["flickr30k"]["t2i_r5"] == 100.0  # 5 images: each caption's image is in its top 5
    markdown = (run / "retrieval_summary.md").read_text()
    assert "| flickr30k |" in markdown and "| paper: unime-llava16 | 81.9 | | | 93.4 | | |" in markdown
    assert "| paper: unime-llava16 | 89.0 | 71.5 | 94.4 |" in markdown


def test_sugarcrepe_is_a_strict_pairwise_accuracy(run, unime, sources):
    sugar = retrieval_data.read_sugarcrepe(sources["root"] / "sugar", sources["root"] / "images")
    score = json.loads((run / "sugarcrepe_score.json").read_text())
    for subset in sugar:
        image = unime.encode(images=subset.images)
        positive, negative = unime.encode(texts=subset.positives), unime.encode(texts=subset.negatives)
        wins = np.einsum("nd,nd->n", image, positive) > np.einsum("nd,nd->n", image, negative)
        assert score[subset.name] == pytest.approx(wins.mean(), abs=1e-12)
    assert score["swap"] == pytest.approx((score["swap_obj"] + score["swap_att"]) / 2)


def _no_nan(constant: str) -> None:
    raise AssertionError(f"{constant} in a score file")


def test_a_sugarcrepe_subset_with_nothing_scorable_is_reported_and_left_out(
    hf_dir, sources, tmp_path, capsys
):
    """No NaN: the subset is null, said so, and its group is the mean of the scored subsets."""
    sugar = tmp_path / "sugar"
    shutil.copytree(sources["root"] / "sugar", sugar)
    records = json.loads((sugar / "swap_att.json").read_text())
    (sugar / "swap_att.json").write_text(
        json.dumps({k: {**r, "filename": "gone.png"} for k, r in records.items()})
    )
    args = [
        "retrieval",
        "--model",
        str(hf_dir),
        "--no-progress",
        "--sugarcrepe-images",
        str(sources["root"] / "images"),
    ]
    assert main([*args, "--out", str(tmp_path / "out"), "--sugarcrepe", str(sugar)]) == 0
    err = capsys.readouterr().err
    assert (
        "sugarcrepe: subset(s) swap_att unscored (no item could be embedded), left out of the group means"
        in err
    )
    score = json.loads((tmp_path / "out" / "sugarcrepe_score.json").read_text(), parse_constant=_no_nan)
    assert (score["swap_att"], score["num_swap_att"], score["num_skipped"]) == (None, 0, 3)
    assert score["swap"] == score["swap_obj"] and score["num_swap_obj"] == 3
    summary = json.loads((tmp_path / "out" / "retrieval_summary.json").read_text(), parse_constant=_no_nan)
    assert summary["sugarcrepe"]["swap_att"] is None
    assert summary["sugarcrepe"]["swap"] == pytest.approx(100 * score["swap_obj"])
    markdown = (tmp_path / "out" / "retrieval_summary.md").read_text()
    assert "Not scored (no item could be embedded; left out of the group means): swap_att" in markdown
    # Nothing scorable at all is an error, as for a pairs set.
    for subset in SUGARCREPE_SUBSETS:
        (sugar / f"{subset}.json").write_text("{}")
    assert main([*args, "--out", str(tmp_path / "empty"), "--sugarcrepe", str(sugar)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: sugarcrepe: nothing could be embedded; first problem: every subset is empty"
    )


def test_metric_definitions():
    """Image->text hits with any of the image's captions; text->image needs the caption's own image."""
    images = np.eye(3)
    captions = np.array([[1, 0, 0], [0.1, 0.9, 0], [0.9, 0, 0.1], [0, 0, 1.0]])  # caption 2 is image 1's
    metrics = pair_metrics(images, captions, [0, 1, 1, 2])
    assert metrics["t2i_r1"] == 0.75  # caption 2 finds image 0
    assert metrics["i2t_r1"] == 1.0  # image 1 still finds its caption 1
    assert metrics["t2i_r5"] == metrics["i2t_r10"] == 1.0


def test_a_run_without_datasets_or_with_a_bad_file_is_one_error(hf_dir, tmp_path, capsys):
    assert main(["retrieval", "--model", str(hf_dir), "--out", str(tmp_path)]) == 1
    assert "no dataset given" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text("nothing here\n")
    assert (
        main(
            [
                "retrieval",
                "--model",
                str(hf_dir),
                "--out",
                str(tmp_path),
                "--pairs",
                str(tmp_path / "bad.jsonl"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"error: {tmp_path / 'bad.jsonl'} holds no usable pairs; first problem: {tmp_path / 'bad.jsonl'}:1: not valid JSON (Expecting value: line 1 column 1 (char 0))"
    )

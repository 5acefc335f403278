"""`python -m unime_jax.eval mmeb` on a tiny LLaVA-NeXT (and a tiny LLaVA-OneVision) against
transformers + numpy computing the protocol independently; resume, bad data, refused reruns, the V2
layout and 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import onevision
from helpers.eval_fixtures import (
    IMAGE_TARGET,
    read_preds,
    reference_predictions,
    write_images,
    write_mmeb_v1,
    write_parquet,
)
from helpers.llava import Reference, write_tiny_llava
from helpers.reference import PARSERS_SCRIPT, run_reference_json
from PIL import Image

from unime_jax.eval.cli import main
from unime_jax.eval.fingerprint import WINDOW, WINDOWS, model_fingerprint
from unime_jax.eval.mmeb import predict
from unime_jax.eval.mmeb_data import Item, MmebDataset, Row, read_dataset
from unime_jax.eval.mmeb_tasks import MMEB_DATASETS

REPO = Path(__file__).resolve().parents[1]
MARGIN = 2e-4  # our embeddings match transformers' to 1e-4 per element; predictions need a clear winner


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return write_tiny_llava(tmp_path_factory.mktemp("eval") / "hf")


@pytest.fixture(scope="module")
def reference(hf_dir) -> Reference:
    return Reference(hf_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    root = tmp_path_factory.mktemp("mmeb")
    return root, write_mmeb_v1(root)


def _mmeb(hf_dir: Path, data_root: Path, out: Path, *extra: str) -> int:
    return main(
        ["mmeb", "--model", str(hf_dir), "--data", str(data_root), "--out", str(out), "--no-progress", *extra]
    )


@pytest.fixture(scope="module")
def native_run(hf_dir, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("native")
    assert _mmeb(hf_dir, data[0], out, "--chunk-size", "7") == 0
    return out


def assert_scored_as_the_reference(out: Path, data: tuple[Path, dict[str, list[dict]]], reference) -> None:
    """Every dataset's predictions and score file in `out` are those of transformers + numpy."""
    root, datasets = data
    for name, rows in datasets.items():
        expected, margin = reference_predictions(reference, root, rows)
        assert margin > MARGIN, f"{name}: the fixture has a near tie ({margin:.2e}); pick other data"
        assert read_preds(out / f"{name}_pred.jsonl") == expected, name
        score = json.loads((out / f"{name}_score.json").read_text())
        correct = sum(p == 0 for p in expected)
        assert score == {
            "acc": correct / len(rows),
            "num_correct": correct,
            "num_pred": len(rows),
            "num_rows": len(rows),
            "num_skipped": 0,
            "num_tied": 0,  # the all-ties row repeats one item: no tie between different items
        }


def test_predictions_match_an_independent_transformers_computation(native_run, data, reference):
    assert_scored_as_the_reference(native_run, data, reference)
    # The all-ties row: every candidate is the same item, so the first maximum (the positive) wins.
    assert read_preds(native_run / "MSCOCO_t2i_pred.jsonl")[-1] == 0
    assert not (native_run / "cache" / "VOC2007").exists()  # the cache goes once a dataset is scored


def test_llava_onevision_predictions_match_an_independent_transformers_computation(data, tmp_path):
    """OneVision's SigLIP tiles, anyres_max downscale and Qwen2 prompts, the same fixture and protocol."""
    hf = onevision.write_tiny_onevision(tmp_path / "hf")
    assert _mmeb(hf, data[0], tmp_path / "out", "--chunk-size", "7") == 0
    assert_scored_as_the_reference(tmp_path / "out", data, onevision.Reference(hf))


def test_ties_go_to_the_first_maximum_and_are_counted():
    """VLM2Vec's get_pred: np.argmax; different items with equal scores are a tie the rule decides."""
    query, a, b, c = Item("q", ""), Item("a", ""), Item("b", ""), Item("c", "")
    rows = [Row(0, "f", 0, query, (a, b, c)), Row(1, "f", 1, query, (c, b, a)), Row(2, "f", 2, query, (b, b))]
    dataset = MmebDataset("X", "v1", [], 3, rows)
    index = {query: 0, a: 1, b: 2, c: 3}
    embeddings = np.array([[1, 0], [0.6, 0.8], [0.6, 0.8], [0, 1]], np.float32)  # a and b are equal
    preds, skipped, tied = predict(dataset, index, embeddings, [""] * 4)
    assert preds == {0: 0, 1: 1, 2: 0} and not skipped
    assert tied == 2  # rows 0 and 1; row 2's candidates are one item twice


def test_image_size_resizes_every_image_first(hf_dir, data, reference, tmp_path):
    root, datasets = data
    assert _mmeb(hf_dir, root, tmp_path, "--image-size", "40", "--datasets", "NIGHTS,VOC2007") == 0
    for name in ("NIGHTS", "VOC2007"):
        expected, margin = reference_predictions(reference, root, datasets[name], image_size=40)
        assert margin > MARGIN
        assert read_preds(tmp_path / f"{name}_pred.jsonl") == expected


def test_summary_holds_both_overalls_in_percent(native_run):
    summary = json.loads((native_run / "summary.json").read_text())
    acc = {n: json.loads((native_run / f"{n}_score.json").read_text())["acc"] for n in summary["per_dataset"]}
    assert set(acc) == {"MSCOCO_t2i", "VOC2007", "WebQA", "NIGHTS"} and summary["datasets"] == 4
    assert summary["overall_36"] == pytest.approx(100 * np.mean(list(acc.values())))
    retrieval = 100 * np.mean([acc["MSCOCO_t2i"], acc["WebQA"], acc["NIGHTS"]])
    assert summary["retrieval"] == pytest.approx(retrieval)
    assert summary["classification"] == pytest.approx(100 * acc["VOC2007"])
    assert summary["overall_meta_mean"] == pytest.approx((retrieval + 100 * acc["VOC2007"]) / 2)
    assert summary["vqa"] is None and summary["ood"] is None
    markdown = (native_run / "summary.md").read_text()
    assert "| VOC2007 | classification | IND |" in markdown and "Not present (32)" in markdown


def test_a_rerun_skips_scored_datasets_and_refuses_other_settings(hf_dir, data, native_run, capsys):
    before = (native_run / "VOC2007_score.json").stat().st_mtime_ns
    assert _mmeb(hf_dir, data[0], native_run, "--datasets", "VOC2007") == 0
    assert (native_run / "VOC2007_score.json").stat().st_mtime_ns == before
    assert "VOC2007: scored earlier" in capsys.readouterr().err
    assert _mmeb(hf_dir, data[0], native_run, "--datasets", "VOC2007", "--image-size", "40") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run.json: image_size was null, now 40" in err[0]


def test_a_copied_model_continues_the_run_and_another_is_refused(hf_dir, data, native_run, tmp_path, capsys):
    """The model counts by its contents: a copy elsewhere, with new file times, is the same model."""
    copy = tmp_path / "copy"
    shutil.copytree(hf_dir, copy, copy_function=shutil.copyfile)
    for file in copy.iterdir():
        os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 10**9))
    assert _mmeb(copy, data[0], native_run, "--datasets", "VOC2007") == 0
    assert "VOC2007: scored earlier" in capsys.readouterr().err
    assert json.loads((native_run / "run.json").read_text())["model"] == str(copy.resolve())
    other = write_tiny_llava(tmp_path / "other", seed=1)  # the same files and sizes, other weights
    assert _mmeb(other, data[0], native_run, "--datasets", "VOC2007") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: {native_run / 'run.json'}: the model's files differ from those of the model these results "
        "were computed with"
    ), err
    assert err[0].endswith(f"use a new --out, or delete {native_run}'s results to recompute them")


def test_the_model_fingerprint_reads_contents_not_paths_or_times(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"layers": 2}')
    size = (WINDOWS + 3) * WINDOW + 12345  # above WINDOWS * WINDOW: read in windows
    weights = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    (model / "model.safetensors").write_bytes(weights.tobytes())
    fingerprint = model_fingerprint(model)
    copy = tmp_path / "copy"
    shutil.copytree(model, copy, copy_function=shutil.copyfile)
    os.utime(copy / "model.safetensors", ns=(0, 0))
    (copy / ".cache").mkdir()  # huggingface-cli's download times
    (copy / ".cache" / "model.safetensors.metadata").write_text("downloaded at 1700000000.0")
    assert model_fingerprint(copy) == fingerprint
    (copy / "config.json").write_text('{"layers": 3}')
    assert model_fingerprint(copy) != fingerprint
    (copy / "config.json").write_text('{"layers": 2}')
    step = (size - WINDOW) // (WINDOWS - 1)
    for offset in (0, 7 * step + 100, size - 1):  # the header, a middle window, the file's end
        changed = weights.copy()
        changed[offset] ^= 1
        (copy / "model.safetensors").write_bytes(changed.tobytes())
        assert model_fingerprint(copy) != fingerprint, offset


def test_the_help_names_every_field_of_the_score_file(native_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["mmeb", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    fields = json.loads((native_run / "VOC2007_score.json").read_text())
    assert [f for f in fields if f'"{f}"' not in help_text] == []


def test_usage_errors_are_one_line(hf_dir, data, tmp_path, capsys):
    assert _mmeb(hf_dir, data[0], tmp_path, "--datasets", "VOC2007,NoSuchSet") == 1
    assert (
        capsys.readouterr().err.strip()
        == f"error: no {data[0]}/<name>/test-*.parquet for dataset(s) NoSuchSet"
    )
    assert _mmeb(hf_dir, data[0], tmp_path, "--datasets", "VOC2007", "--num-crops", "4") == 1
    assert "LlavaNextConfig has no setting num_crops" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "mmeb",
                "--model",
                str(hf_dir),
                "--data",
                str(data[0]),
                "--out",
                str(tmp_path),
                "--compare",
                "nope",
            ]
        )
    assert exit_info.value.code == 2


def test_num_crops_is_a_phi3_v_setting():
    from helpers.tiny_configs import llava_config, phi3_v_config

    from unime_jax.backbones import with_runtime

    assert with_runtime(phi3_v_config(), num_crops=16).max_crops == 17
    with pytest.raises(ValueError, match="LlavaNextConfig has no setting num_crops"):
        with_runtime(llava_config(), num_crops=4)


def test_bad_rows_and_images_are_counted_and_reported(hf_dir, tmp_path, capsys):
    root = tmp_path / "data"
    images = write_images(root, 4)
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    query = "<|image_1|>\nFind a day-to-day image that looks similar to the provided image.\n"

    def row(query_image: str, targets: list[str]) -> dict:
        return {"qry_text": query, "qry_img_path": query_image, "tgt_text": [IMAGE_TARGET] * len(targets),
                "tgt_img_path": targets}  # fmt: skip

    rows = [
        row(images[0], [images[1], images[2]]),
        row(images[1], [images[2], "images/missing.png"]),  # a candidate file is missing
        row("images/corrupt.png", [images[3], images[0]]),  # the query image does not decode
        {**row(images[2], [images[3], images[0]]), "tgt_text": [IMAGE_TARGET]},  # lists of unequal length
        {**row(images[3], [images[0]]), "qry_text": None},  # a null text
        row(images[3], [images[0], images[1]]),
    ]
    write_parquet(root, "NIGHTS", rows)
    assert _mmeb(hf_dir, root, tmp_path / "out") == 0
    err = capsys.readouterr().err
    file = root / "NIGHTS" / "test-00000-of-00001.parquet"
    assert "NIGHTS: 4 row(s) not scored" in err and f"{file} row 3: tgt_text has 1 candidates" in err
    score = json.loads((tmp_path / "out" / "NIGHTS_score.json").read_text())
    assert (score["num_pred"], score["num_rows"], score["num_skipped"]) == (2, 6, 4)
    preds = [json.loads(line) for line in (tmp_path / "out" / "NIGHTS_pred.jsonl").read_text().splitlines()]
    assert [p["pred"] is None for p in preds] == [False, True, True, True, True, False]
    skipped = [
        json.loads(line) for line in (tmp_path / "out" / "NIGHTS_skipped.jsonl").read_text().splitlines()
    ]
    assert [s["file_row"] for s in skipped] == [1, 2, 3, 4] and all(s["file"] == str(file) for s in skipped)
    assert "candidate 1: cannot read image" in skipped[0]["reason"] and "missing.png" in skipped[0]["reason"]
    assert (
        skipped[1]["reason"].startswith("the query: cannot read image")
        and "corrupt.png" in skipped[1]["reason"]
    )
    assert "qry_text must be a string, got None" in skipped[3]["reason"]


def _env(devices: int) -> dict:
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    env["PYTHONPATH"] = str(REPO)
    return env


def _cli(*args: str, devices: int = 2) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "unime_jax.eval", "mmeb", "--no-progress", *args],
        env=_env(devices), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def test_a_killed_run_resumes_from_its_cached_chunks(hf_dir, data, native_run, tmp_path):
    """SIGKILL once the first chunks are on disk; the rerun keeps them and ends as a straight run."""
    out = tmp_path / "out"
    args = (
        "--model",
        str(hf_dir),
        "--data",
        str(data[0]),
        "--out",
        str(out),
        "--chunk-size",
        "1",
        "--keep-embeddings",
    )
    proc = _cli(*args, "--datasets", "NIGHTS")
    cache = out / "cache" / "NIGHTS"
    deadline = time.monotonic() + 300
    while len(list(cache.glob("chunk-*.npz"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, (
            proc.stdout.read() if proc.poll() else "timeout"
        )
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "NIGHTS_score.json").exists(), "the run finished before it was killed"
    kept = {p.name: p.stat().st_mtime_ns for p in cache.glob("chunk-*.npz")}
    _finish(_cli(*args, "--datasets", "NIGHTS"))
    assert all((cache / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    assert len(list(cache.glob("chunk-*.npz"))) == len(read_dataset(data[0], "NIGHTS").items())
    assert read_preds(out / "NIGHTS_pred.jsonl") == read_preds(native_run / "NIGHTS_pred.jsonl")
    assert (out / "NIGHTS_score.json").read_text() == (native_run / "NIGHTS_score.json").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_predictions_of_one(hf_dir, data, native_run, tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    args = ("--model", str(hf_dir), "--data", str(data[0]), "--out", str(tmp_path), "--chunk-size", "5")
    procs = [_cli(*args, "--coordinator-address", address, "--num-processes", "2", "--process-id", str(i))
             for i in range(2)]  # fmt: skip
    for proc in procs:
        _finish(proc)
    for name in data[1]:
        assert read_preds(tmp_path / f"{name}_pred.jsonl") == read_preds(native_run / f"{name}_pred.jsonl")


# ------------------------------------------------------------------------------------------------
# The MMEB-V2 instruct layout: the V1 strings rebuilt, as VLM2Vec's own parsers rebuild them
# ------------------------------------------------------------------------------------------------

# (dataset, its V2 fields, the V1 strings MMEB-eval stores for the same row)
V2_CASES = [
    ("ImageNet-1K", {"qry_inst": "<|image_1|>\nRepresent the given image for classification", "qry_text": "",
                     "qry_img_path": "a.jpg", "tgt_inst": "", "tgt_text": ["tench", "goldfish"]},
     Item("<|image_1|>\nRepresent the given image for classification\n", "a.jpg"), ["tench", "goldfish"], None),
    ("N24News", {"qry_inst": "<|image_1|>\nRepresent the given news image with the following caption for domain "
                 "classification:", "qry_text": "Stocks fell.", "qry_img_path": "n.jpg", "tgt_inst": "",
                 "tgt_text": ["business", "sports"]},
     Item("<|image_1|>\nRepresent the given news image with the following caption for domain classification: "
          "Stocks fell.\n", "n.jpg"), ["business", "sports"], None),
    ("OK-VQA", {"qry_inst": "<|image_1|> Represent the given image with the following question:",
                "qry_text": "What is it?", "qry_img_path": "q.jpg", "tgt_inst": "", "tgt_text": ["a dog", "a cat"]},
     Item("<|image_1|>\nRepresent the given image with the following question: What is it?\n", "q.jpg"),
     ["a dog", "a cat"], None),
    ("MSCOCO_i2t", {"qry_inst": "<|image_1|>\nFind an image caption describing the given everyday image.",
                    "qry_text": "", "qry_img_path": "c.jpg", "tgt_inst": "", "tgt_text": ["A man.", "A dog."]},
     Item("<|image_1|>\nFind an image caption describing the given everyday image.\n", "c.jpg"),
     ["A man.", "A dog."], None),
    ("VisDial", {"qry_inst": "<|image_1|>\nRepresent the given dialogue about an image, which is used for image "
                 "retrieval:", "qry_text": "Q: is it red?\nA: yes", "qry_img_path": "",
                 "tgt_inst": "<|image_1|>\nRepresent the given image.", "tgt_text": ["", ""]},
     Item("<|image_1|>\nRepresent the given dialogue about an image, which is used for image retrieval: "
          "Q: is it red?\nA: yes\n\n", ""), ["<|image_1|>\nRepresent the given image.\n"] * 2, ["x.jpg", "y.jpg"]),
    ("WebQA", {"qry_inst": "<|image_1|>\nFind a Wikipedia image that answers this question:",
               "qry_text": "Who built it?", "qry_img_path": "",
               "tgt_inst": "<|image_1|>\nRepresent the given Wikipedia image with related text information:",
               "tgt_text": ["Eiffel Tower.", "Big Ben."]},
     Item("<|image_1|>\nFind a Wikipedia image that answers this question: Who built it?\n", ""),
     ["<|image_1|>\nRepresent the given Wikipedia image with related text information: Eiffel Tower.\n",
      "<|image_1|>\nRepresent the given Wikipedia image with related text information: Big Ben.\n"],
     ["x.jpg", "y.jpg"]),
    ("CIRR", {"qry_inst": "<|image_1|>\nGiven an image, find a similar everyday image with the described changes:",
              "qry_text": "make it blue", "qry_img_path": "r.jpg",
              "tgt_inst": "<|image_1|>\nRepresent the given image.", "tgt_text": ["", ""]},
     Item("<|image_1|>\nGiven an image, find a similar everyday image with the described changes: make it blue\n",
          "r.jpg"), ["<|image_1|>\nRepresent the given image."] * 2, ["x.jpg", "y.jpg"]),
    ("RefCOCO-Matching", {"qry_inst": "<|image_1|>\nSelect the portion of the image that follows the language "
                          "expressions:", "qry_text": '"the left dog"', "qry_img_path": "m.jpg",
                          "tgt_inst": "<|image_1|>\nSelect the portion of the image that follows the language "
                          "expressions:", "tgt_text": ['"the left dog"', '"a cat"']},
     Item('<|image_1|>\nSelect the portion of the image that follows the language expressions: "the left dog"\n',
          "m.jpg"),
     ['<|image_1|>\nSelect the portion of the image that follows the language expressions: "the left dog"\n',
      '<|image_1|>\nSelect the portion of the image that follows the language expressions: "a cat"\n'],
     ["x.jpg", "y.jpg"]),
]  # fmt: skip


def _v2_record(fields: dict, images: list[str] | None) -> dict:
    return {**fields, "tgt_img_path": images or [""] * len(fields["tgt_text"])}


def test_the_v2_instruct_layout_is_read_as_the_v1_strings(tmp_path):
    for name, fields, query, texts, images in V2_CASES:
        write_parquet(tmp_path, name, [_v2_record(fields, images)])
        dataset = read_dataset(tmp_path, name)
        assert dataset.layout == "v2" and not dataset.bad
        row = dataset.rows[0]
        assert row.query == query, name
        assert row.candidates == tuple(
            Item(t, i) for t, i in zip(texts, images or [""] * len(texts), strict=True)
        )


def test_vlm2vecs_own_v2_parsers_rebuild_the_same_strings(tmp_path):
    """MMEB-V2's parsers (vlm2vec-for-pyserini, in .venv-ref) on the same rows: the same texts and images."""
    spec = {"datasets": []}
    for name, fields, _query, _texts, images in V2_CASES:
        record = _v2_record(fields, images)
        spec["datasets"].append({"parser": MMEB_DATASETS[name].parser, "name": name, "image_root": "/root",
                                 "rows": {k: [v] for k, v in record.items()}})  # fmt: skip
    results = run_reference_json(PARSERS_SCRIPT, spec, tmp_path)
    for (name, _fields, query, texts, images), result in zip(V2_CASES, results, strict=True):
        assert result["query_text"] == [query.text], name
        assert result["query_image"] == [f"/root/{query.image}" if query.image else None], name
        assert result["cand_text"] == [texts], name
        assert result["cand_image"] == [[f"/root/{i}" for i in images] if images else [None] * len(texts)], (
            name
        )


def test_a_v2_dataset_outside_the_36_is_refused(tmp_path):
    write_parquet(tmp_path, "MyTask", [_v2_record(V2_CASES[0][1], None)])
    with pytest.raises(Exception, match="MyTask' is not one of the 36"):
        read_dataset(tmp_path, "MyTask")


def test_image_files_are_resolved_against_the_image_root(hf_dir, tmp_path, capsys):
    images = tmp_path / "images_elsewhere"
    paths = write_images(images, 3)
    rows = [{"qry_text": "<|image_1|>\nIdentify the object shown in the image\n", "qry_img_path": paths[0],
             "tgt_text": ["dog", "cat"], "tgt_img_path": ["", ""]}]  # fmt: skip
    write_parquet(tmp_path / "data", "VOC2007", rows)
    assert Image.open(images / paths[0]).size
    # Without --image-root nothing can be scored: an error that says where images were looked for.
    assert _mmeb(hf_dir, tmp_path / "data", tmp_path / "wrong") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err.startswith("error: no row of VOC2007 could be scored")
        and f"--image-root {tmp_path / 'data'}" in err
    )
    assert _mmeb(hf_dir, tmp_path / "data", tmp_path / "out", "--image-root", str(images)) == 0
    assert json.loads((tmp_path / "out" / "VOC2007_score.json").read_text())["num_pred"] == 1

"""MMEB-train source and stage-2 pipeline on real parquet files and real image files (skimage photos)."""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers.mmeb_train import write_subset
from helpers.tokenizers import mistral_tokenizer
from PIL import Image

from unime_jax.data.config import DataSection, LoaderSection, MmebSection
from unime_jax.data.errors import DataError
from unime_jax.data.pipeline import stage2_pipeline
from unime_jax.processing.text import TextFeaturizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
from unime_jax.data.mmeb import MmebSource  # noqa: E402 -- needs pyarrow, checked just above

skimage_data = pytest.importorskip("skimage.data")

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
VQA = "<|image_1|>\nRepresent the given image with the following question: "


@dataclass(frozen=True)
class ToyFeaturizer:
    """Stands in for a backbone featurizer: text tokens plus one 16x16 'crop' (zeros without an image)."""

    text: TextFeaturizer

    def __call__(self, text: str, image: Image.Image | None) -> dict[str, np.ndarray]:
        pixels = np.zeros((1, 3, 16, 16), np.float32)
        sizes = np.zeros(2, np.int32)
        if image is not None:
            pixels[0] = np.asarray(image.resize((16, 16)), np.float32).transpose(2, 0, 1) / 255
            sizes[:] = (image.height, image.width)
        features = self.text(text.replace("<|image_1|>", "<image>"))
        return features | {"pixel_values": pixels, "image_sizes": sizes}


def write_images(root: Path) -> list[str]:
    """Real photos, small, as PNG and JPEG, under root/images/; returns their relative paths."""
    paths = []
    for i, name in enumerate(PHOTOS):
        rel = f"images/photos/{name}.{'png' if i % 2 else 'jpg'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(skimage_data, name)()).convert("RGB").resize((48, 32)).save(root / rel)
        paths.append(rel)
    (root / "images/photos/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return paths


@pytest.fixture(scope="module")
def mmeb_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mmeb")
    photos = write_images(root)
    vqa = [
        (f"{VQA}What is shown, case {i}?\n", photos[i % 4], ["Yes", "No", "a cat", "coffee"][i % 4], "")
        for i in range(12)
    ]
    vqa[3] = (vqa[3][0], "images/photos/missing.jpg", "No", "")  # image file absent
    vqa[6] = (vqa[6][0], "images/photos/corrupt.jpg", "a cat", "")  # unreadable image bytes
    write_subset(root, "OK-VQA", vqa)
    t2i = [
        (
            f"Find me an everyday image that matches the given caption: photo {i}",
            "",
            "<|image_1|>\nRepresent the given image.",
            photos[i % 4],
        )
        for i in range(6)
    ]
    t2i[2] = ("   ", "", t2i[2][2], t2i[2][3])  # empty query text
    write_subset(root, "MSCOCO_t2i", t2i)
    write_subset(
        root,
        "HatefulMemes",
        [(f"{VQA}hateful? {i}", photos[i % 4], ["Yes", "No"][i % 2], "") for i in range(6)],
    )
    write_subset(
        root,
        "HatefulMemes",
        [(f"<|image_1|>\nIs it hateful? {i}", photos[0], "Yes", "") for i in range(6)],
        "diverse_instruction",
    )
    return root


@pytest.fixture(scope="module")
def featurizer() -> ToyFeaturizer:
    return ToyFeaturizer(TextFeaturizer(mistral_tokenizer(), 48))


def test_source_records_subsets_caps_and_target_ids(mmeb_root: Path) -> None:
    source = MmebSource(mmeb_root, "original", max_per_subset=10)
    assert source.subsets == ("HatefulMemes", "MSCOCO_t2i", "OK-VQA")
    assert source.subset_sizes == {"HatefulMemes": 6, "MSCOCO_t2i": 6, "OK-VQA": 10}
    record = source[6 + 6 + 2]
    assert (record.subset, record.row, record.index) == ("OK-VQA", 2, 14)
    assert record.file.endswith("OK-VQA/original-00000-of-00001.parquet")
    assert record.query.image_path == "images/photos/coffee.jpg" and record.target.text == "a cat"
    keys = [(source[i].target.text, source[i].target.image_path) for i in range(len(source))]
    ids = source.target_ids
    for i in range(len(source)):
        for j in range(len(source)):
            assert (ids[i] == ids[j]) == (keys[i] == keys[j])
    assert ids[0] == ids[6 + 6]  # "Yes" in HatefulMemes and OK-VQA: one target
    assert len(pickle.dumps(source)) < 4000  # workers reload the parquet files
    assert pickle.loads(pickle.dumps(source))[14] == record


def test_a_source_knows_whether_it_serves_images(mmeb_root: Path, tmp_path: Path) -> None:
    assert MmebSource(mmeb_root, "original", subsets=("MSCOCO_t2i",)).has_images  # targets only
    write_subset(tmp_path, "WebQA", [("Find it: a question", "", "an answer", None)])
    write_subset(tmp_path, "VisDial", [("Q: and A: dialogue", None, "a caption", "")])
    assert not MmebSource(tmp_path, "original").has_images  # empty and null paths are no images


def test_split_and_subset_selection(mmeb_root: Path) -> None:
    source = MmebSource(mmeb_root, "diverse_instruction", subsets=("HatefulMemes",))
    assert len(source) == 6 and source[0].query.text.startswith("<|image_1|>\nIs it hateful?")
    with pytest.raises(
        DataError,
        match=r"'SUN397' has no original-\*\.parquet .* subsets with that split: HatefulMemes, MSCOCO_t2i, OK-VQA",
    ):
        MmebSource(mmeb_root, "original", subsets=("SUN397",))
    with pytest.raises(DataError, match="unknown MMEB split 'train'"):
        MmebSource(mmeb_root, "train")


def test_missing_column_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "VOC2007").mkdir()
    pq.write_table(
        pa.table({"qry": ["q"], "pos_text": ["t"]}), tmp_path / "VOC2007" / "original-00000-of-00001.parquet"
    )
    with pytest.raises(
        DataError,
        match=r"VOC2007/original-00000-of-00001\.parquet lacks column\(s\) qry_image_path, pos_image_path",
    ):
        MmebSource(tmp_path)


def stage2(root: Path, featurizer: ToyFeaturizer, **kwargs) -> object:
    data = DataSection(
        loader=LoaderSection(batch_size=4, read_threads=0), mmeb=MmebSection(str(root), max_per_subset=None)
    )
    return stage2_pipeline(data, featurizer, seed=0, process_index=0, process_count=1, **kwargs)


def test_stage2_batches_skip_bad_images_and_texts(mmeb_root: Path, featurizer: ToyFeaturizer, caplog) -> None:
    pipe = stage2(
        mmeb_root,
        featurizer,
    )
    assert pipe.batches_per_epoch == 24 // 4
    it = iter(pipe)
    with caplog.at_level(logging.WARNING, logger="unime_jax.data"):
        batches = [next(it) for _ in range(pipe.batches_per_epoch)]
    batch = batches[0]
    assert sorted(batch) == sorted(
        [
            f"{side}_{key}"
            for side in ("query", "target")
            for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes")
        ]
        + ["target_ids"]
    )
    assert batch["query_input_ids"].shape == (4, 48) and batch["query_pixel_values"].shape == (
        4,
        1,
        3,
        16,
        16,
    )
    assert batch["target_image_sizes"].shape == (4, 2) and batch["target_ids"].shape == (4,)
    assert batch["target_ids"].dtype == batch["query_image_sizes"].dtype == np.int32
    counts = it.epoch_counts(0)
    assert counts.samples == 24 and counts.skipped == {
        "missing_image": 1,
        "unreadable_image": 1,
        "empty_text": 1,
    }
    for where in (
        "skipping bad sample (missing_image): {}/OK-VQA/original-00000-of-00001.parquet row 3 (OK-VQA) qry: ",
        "skipping bad sample (unreadable_image): {}/OK-VQA/original-00000-of-00001.parquet row 6 (OK-VQA) qry: ",
        "skipping bad sample (empty_text): {}/MSCOCO_t2i/original-00000-of-00001.parquet row 2 (MSCOCO_t2i) qry",
    ):
        assert where.format(mmeb_root) in caplog.text
    assert all(b["query_input_ids"].shape == (4, 48) for b in batches)  # replacements keep batches full


def test_mined_negatives_add_a_k_axis(mmeb_root: Path, featurizer: ToyFeaturizer) -> None:
    source = MmebSource(mmeb_root, max_per_subset=None)
    good = [i for i in range(len(source)) if i not in (6 + 2, 12 + 3, 12 + 6)]  # avoid the bad records
    table = np.array([[good[(i + s) % len(good)] for s in (1, 2, 3)] for i in range(len(source))])
    batch = next(iter(stage2(mmeb_root, featurizer, negatives=table, num_negatives=2)))
    assert batch["negative_input_ids"].shape == (4, 2, 48)
    assert batch["negative_pixel_values"].shape == (4, 2, 1, 3, 16, 16)
    assert batch["mined_target_ids"].shape == (4, 2)
    assert set(batch["mined_target_ids"].ravel()) <= set(source.target_ids[good])
    with pytest.raises(DataError, match="need 24 rows"):
        stage2(mmeb_root, featurizer, negatives=table[:5], num_negatives=2)

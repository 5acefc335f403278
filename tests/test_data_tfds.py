"""TFDS adapter: a dataset prepared by tensorflow_datasets itself (ArrayRecord, PNG bytes), read without TF."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unime_jax.data.config import LoaderSection
from unime_jax.data.errors import DataError
from unime_jax.data.examples import Example
from unime_jax.data.images import decode_image
from unime_jax.data.pipeline import build_pipeline
from unime_jax.data.tfds_source import TfdsRecord, TfdsSource

tfds = pytest.importorskip("tensorflow_datasets")
skimage_data = pytest.importorskip("skimage.data")

N = 12
CORRUPT = 4  # id of the record whose image bytes are not an image


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert("RGB").resize((24, 16)).save(buffer, format="PNG")
    return buffer.getvalue()


class Captions(tfds.core.GeneratorBasedBuilder):
    """Images with captions; images are given as PNG bytes, which tfds stores without TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"id": tfds.features.Scalar(np.int64), "image": tfds.features.Image(shape=(None, None, 3))}
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features | {"caption": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        photos = [png(skimage_data.astronaut()), png(skimage_data.chelsea()), png(skimage_data.coffee())]
        for i in range(N):
            image = b"\x89PNG\r\n\x1a\n truncated" if i == CORRUPT else photos[i % 3]
            yield i, {"id": i, "image": image, "caption": f"photo number {i}"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    builder = Captions(data_dir=str(tmp_path_factory.mktemp("tfds")), file_format="array_record")
    builder.download_and_prepare()
    assert "tensorflow" not in sys.modules
    return Path(builder.data_dir)


def image_example(record: TfdsRecord) -> Example:
    image = decode_image(record.features["image"], record.where)
    return Example({"pixels": np.asarray(image, np.uint8), "id": np.int32(record.features["id"])})


def decoded_example(record: TfdsRecord) -> Example:
    return Example({"pixels": record.features["image"], "id": np.int32(record.features["id"])})


def test_reads_records_without_tensorflow(prepared: Path) -> None:
    raw = TfdsSource(prepared, "train", undecoded=("image",))
    assert len(raw) == N
    position = {int(raw[i].features["id"]): i for i in range(N)}
    assert sorted(position) == list(range(N))
    assert isinstance(raw[position[1]].features["image"], bytes)
    record = TfdsSource(prepared, "train")[position[1]]
    assert record.features["caption"] == b"photo number 1" and record.features["image"].shape == (16, 24, 3)
    assert record.where.endswith(f"captions/1.0.0[train] record {position[1]}")
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize(
    ("undecoded", "make_example", "reason"),
    [
        (("image",), image_example, "unreadable_image"),  # decoded by the featurizer
        ((), decoded_example, "unreadable_record"),  # decoded by tfds in the source
    ],
)
def test_pipeline_skips_the_corrupt_image(prepared: Path, undecoded, make_example, reason) -> None:
    source = TfdsSource(prepared, "train", undecoded=undecoded)
    pipe = build_pipeline(
        source,
        make_example,
        LoaderSection(batch_size=4, read_threads=0),
        seed=0,
        process_index=0,
        process_count=1,
    )
    it = iter(pipe)
    batches = [next(it) for _ in range(pipe.batches_per_epoch)]
    assert all(b["pixels"].shape == (4, 16, 24, 3) for b in batches)
    assert CORRUPT not in np.concatenate([b["id"] for b in batches])
    assert it.epoch_counts(0).skipped == {reason: 1}


def test_open_errors(prepared: Path, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(DataError, match="has no split 'test'; splits: train"):
        TfdsSource(prepared, "test")
    with pytest.raises(DataError, match="is not a prepared TFDS dataset"):
        TfdsSource(tmp_path, "train")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"install the 'tfds' extra"):
        TfdsSource(prepared, "train")

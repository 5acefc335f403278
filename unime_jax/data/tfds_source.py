"""A prepared TFDS dataset directory (ArrayRecord files) as a grain source, without TensorFlow.

tensorflow-datasets reads ArrayRecord datasets with numpy and PIL alone, as long as the dataset
was prepared with ``file_format="array_record"``. (Preparing one without TensorFlow needs images
fed as encoded PNG/JPEG bytes, see ``tests/test_data_tfds.py``.) The package is the optional
``tfds`` extra and is imported only when a source is opened.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unime_jax.data.errors import BadSample, DataError
from unime_jax.processing.images import DECODE_ERRORS

__all__ = ["TfdsRecord", "TfdsSource"]


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"reading TFDS datasets needs tensorflow-datasets ({e}); install the 'tfds' extra: "
            "pip install -e '.[tfds]' (TensorFlow itself is not needed)"
        ) from e
    return tfds


@dataclass(frozen=True)
class TfdsRecord:
    index: int
    where: str  # "<dir>[<split>] record <index>", for skip logs
    features: dict[str, Any]  # decoded features (text as bytes, images as uint8 arrays)


class TfdsSource:
    """Random access to one split of a prepared TFDS dataset.

    Args:
      directory: the versioned dataset directory holding ``dataset_info.json``, e.g.
        ``~/tensorflow_datasets/my_dataset/1.0.0``.
      split: a split name or TFDS split expression, e.g. ``train`` or ``train[:90%]``.
      undecoded: features returned as stored bytes instead of decoded, e.g. ``("image",)`` to
        decode images in the featurizer (with :func:`unime_jax.data.images.decode_image`).

    A record that fails to decode is a :class:`BadSample` (``unreadable_record``), which the
    pipeline skips and counts.
    """

    def __init__(self, directory: str | os.PathLike[str], split: str, undecoded: Sequence[str] = ()) -> None:
        tfds = _import_tfds()
        self.directory = Path(directory)
        self.split = split
        if not (self.directory / "dataset_info.json").is_file():
            raise DataError(
                f"{self.directory} is not a prepared TFDS dataset (no dataset_info.json); pass the "
                "versioned directory, e.g. ~/tensorflow_datasets/<name>/<version>"
            )
        builder = tfds.builder_from_directory(str(self.directory))
        splits = builder.info.splits.keys()
        if split.split("[")[0] not in splits:
            raise DataError(f"{self.directory} has no split {split!r}; splits: {', '.join(sorted(splits))}")
        decoders = {name: tfds.decode.SkipDecoding() for name in undecoded}
        try:
            self._source = builder.as_data_source(split=split, decoders=decoders or None)
        except (NotImplementedError, ValueError) as e:
            raise DataError(
                f"cannot read {self.directory} [{split}] without TensorFlow: {e}; it must be prepared "
                "with file_format='array_record'"
            ) from e

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> TfdsRecord:
        where = f"{self.directory}[{self.split}] record {index}"
        try:
            features = self._source[index]
        except DECODE_ERRORS as e:  # tfds decodes images with PIL
            raise BadSample("unreadable_record", f"{where}: {e}") from e
        return TfdsRecord(index, where, features)

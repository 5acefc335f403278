"""Opening images for featurizers: every failure becomes a counted :class:`BadSample`."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from unime_jax.data.errors import BadSample
from unime_jax.processing.images import DECODE_ERRORS, resize_square


def _decoded_rgb(image: Image.Image, size: int | None = None) -> Image.Image:
    image.load()  # PIL decodes lazily: force it here so corrupt pixel data fails now, not in a featurizer
    return image.convert("RGB") if size is None else resize_square(image, size)


def load_image(path: str | Path, where: str, size: int | None = None) -> Image.Image:
    """Open and fully decode an image file as RGB, first resized to size x size when `size` is given
    (:func:`resize_square`, as the embedder's ``image_size``); `where` names the record for the skip log."""
    try:
        with Image.open(path) as image:
            return _decoded_rgb(image, size)
    except FileNotFoundError as e:
        raise BadSample("missing_image", f"{where}: {path} does not exist") from e
    except DECODE_ERRORS as e:
        raise BadSample("unreadable_image", f"{where}: {path}: {e}") from e


def decode_image(data: bytes, where: str) -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, ...) as RGB; `where` names the record for the skip log."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return _decoded_rgb(image)
    except DECODE_ERRORS as e:
        raise BadSample("unreadable_image", f"{where}: {e}") from e

"""`UniME`: load a backbone and embed texts, images or image+text pairs.

    from unime_jax import UniME

    model = UniME.load("path/to/UniME-LLaVA-1.6-7B")        # HF directory or converted checkpoint
    texts = model.encode(texts=["a dog on a beach", "a red car"])
    images = model.encode(images=["dog.jpg", "car.png"])
    scores = texts @ images.T                                # cosine similarities

Embeddings are the final-norm hidden state of each prompt's last token, L2-normalised (float32).

Batching: inputs are tokenised first (images only have their headers read), then grouped into
text-only and image batches, sorted by length and padded to one of a few bucketed lengths and to
a few row counts, so that a handful of compiled programs serve any input. The forward pass is one
`jax.jit` function per model, with the parameters as an argument (compilations are shared across
calls and the weights are not baked into the program); batch rows are split over the mesh's data
axes. Single-process only: each call runs on the local devices of the mesh.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from PIL import Image
from tqdm.auto import tqdm

from unime_jax.backbones import spec_for
from unime_jax.model_io import MODEL_FILE, load_model
from unime_jax.models.pooling import embed
from unime_jax.processing.featurizer import BackboneFeaturizer
from unime_jax.processing.images import DECODE_ERRORS, ImageInput
from unime_jax.sharding import LOGICAL_RULES, batch_sharding, make_mesh

__all__ = ["ImageSource", "InputError", "UniME"]

logger = logging.getLogger(__name__)

# bytes: an encoded image file's contents (e.g. images stored inside a parquet file).
ImageSource = Image.Image | np.ndarray | str | os.PathLike | bytes


class InputError(ValueError):
    """One input cannot be embedded; `index` is its position in the encode call."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"input {index}: {message}")
        self.index = index
        self.message = message


def _describe(source: ImageSource) -> str:
    return f"({len(source)} bytes)" if isinstance(source, bytes) else os.fspath(source)


def _open_file(source: str | os.PathLike | bytes) -> Image.Image:
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def _image_size(source: ImageSource, index: int, resize: int | None) -> tuple[int, int]:
    """(height, width) the processor will see, without decoding pixels (files: the header only)."""
    if isinstance(source, Image.Image):
        size = source.height, source.width
    elif isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise InputError(
                index, f"expected an (H, W, 3) uint8 image array, got {source.dtype} {source.shape}"
            )
        size = int(source.shape[0]), int(source.shape[1])
    elif not isinstance(source, str | os.PathLike | bytes):
        raise InputError(
            index,
            f"an image is a PIL image, a numpy array, a path or encoded bytes, got {type(source).__name__}",
        )
    else:
        try:
            with _open_file(source) as image:
                size = image.height, image.width
        except DECODE_ERRORS as e:
            raise InputError(index, f"cannot read image {_describe(source)}: {e}") from e
    return size if resize is None else (resize, resize)


def _square(image: ImageInput, size: int) -> Image.Image:
    """VLM2Vec's ``process_image``: the image as opened resized to size x size (PIL's default filter
    for its mode, aspect ratio ignored), then converted to RGB."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return image.resize((size, size)).convert("RGB")


def _open_image(source: ImageSource, index: int, resize: int | None) -> ImageInput:
    if isinstance(source, Image.Image | np.ndarray):
        return source if resize is None else _square(source, resize)
    try:
        with _open_file(source) as image:
            image.load()  # decode now, so a corrupt file is reported here, with its index
            return image.convert("RGB") if resize is None else _square(image, resize)
    except DECODE_ERRORS as e:
        raise InputError(index, f"cannot read image {_describe(source)}: {e}") from e


def _rows(
    texts: str | Sequence[str | None] | None, images: ImageSource | Sequence[ImageSource | None] | None
) -> list[tuple[str | None, ImageSource | None]]:
    """(text, image) per input: paired when both are given, else one modality alone."""
    if isinstance(texts, str):
        texts = [texts]
    single_array = isinstance(images, np.ndarray) and images.ndim == 3
    if single_array or isinstance(images, Image.Image | str | os.PathLike):
        images = [images]
    if texts is None and images is None:
        raise ValueError("encode needs texts, images or both")
    if images is None:
        return [(text, None) for text in texts]
    if texts is None:
        return [(None, image) for image in images]
    if len(texts) != len(images):
        raise ValueError(
            f"texts and images are paired row by row; got {len(texts)} texts and {len(images)} images"
        )
    return list(zip(texts, images, strict=True))


def _padded_rows(count: int, batch_size: int, multiple: int) -> int:
    """Rows to run `count` inputs with: a power of two up to batch_size, a multiple of the devices."""
    rows = min(batch_size, 1 << max(count - 1, 0).bit_length())
    return -(-rows // multiple) * multiple


def _forward(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
    model = nnx.merge(graphdef, state)
    return embed(model(**batch), batch["attention_mask"])


@dataclass(frozen=True)
class _Planned:
    index: int  # position in the encode call
    ids: list[int]
    image: ImageSource | None
    image_tokens: int | None  # planned from the image's header size


class UniME:
    """A UniME embedding model: a backbone on a mesh, its tokenizer and its input processing."""

    def __init__(
        self,
        model: nnx.Module,
        model_type: str,
        config: Any,
        tokenizer: Any,
        *,
        mesh: Mesh | None = None,
        max_len: int = 512,
        raw: bool = False,
        instruction: str | None = None,
        image_size: int | None = None,
    ) -> None:
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        self.model_type = model_type
        self.spec = spec_for(model_type)
        self.config = config
        self.tokenizer = tokenizer
        self.mesh = mesh or make_mesh()
        self.max_len = max_len
        self.raw = raw
        self.instruction = instruction
        self.image_size = image_size
        graphdef, self._state = nnx.split(model)
        # One jitted function for the model's lifetime: its cache is keyed on the batch shapes only.
        self._forward = jax.jit(functools.partial(_forward, graphdef))
        self._featurizers: dict[tuple[str | None, bool], BackboneFeaturizer] = {}
        self.featurizer()  # fail now on a tokenizer or template that does not fit the model

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        mesh: Mesh | None = None,
        dtype: str | None = None,
        param_dtype: str | None = None,
        max_len: int = 512,
        raw: bool = False,
        instruction: str | None = None,
        image_size: int | None = None,
        num_crops: int | None = None,
        progress: bool = True,
    ) -> UniME:
        """Load a converted checkpoint (``unime_model.yaml``) or an HF directory (``config.json``,
        converted on the fly), and the tokenizer saved beside it.

        Args:
          mesh: where the parameters live and batches are split (default: all devices, data axis).
          dtype: compute dtype (e.g. ``"bfloat16"``); default the checkpoint's.
          param_dtype: parameter dtype; default the stored one.
          max_len: most text tokens of a text-only input; longer texts are shortened (template kept).
          raw, instruction: the default prompt mode of :meth:`encode` (see ``processing.prompts``).
          image_size: resize every image to image_size x image_size first, as VLM2Vec's
            ``process_image`` does (1344: its ``high``, 672: ``mid``); None keeps native sizes.
          num_crops: the HD crop budget of backbones that have one (Phi-3.5-V); default the
            checkpoint's (``preprocessor_config.json`` for HF directories).
          progress: show the conversion progress bar for HF directories.
        """
        path = Path(path)
        mesh = mesh or make_mesh()
        chosen = {"dtype": dtype, "param_dtype": param_dtype, "num_crops": num_crops}
        runtime = {k: v for k, v in chosen.items() if v is not None}
        if (path / MODEL_FILE).is_file():
            loaded = load_model(path, mesh, **runtime)
        elif (path / "config.json").is_file():
            from unime_jax.conversion import load_hf_model  # the converter is only needed for HF directories

            loaded = load_hf_model(path, mesh, progress=progress, **runtime)
        else:
            raise FileNotFoundError(
                f"{path} is neither a unime-jax checkpoint ({MODEL_FILE}) nor an HF model directory (config.json)"
            )
        import transformers

        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{path}: no usable tokenizer files beside the model: {e}") from e
        except (AttributeError, KeyError, TypeError) as e:  # e.g. files written by another major version
            raise ValueError(
                f"{path}: transformers {transformers.__version__} cannot read these tokenizer files "
                f"({type(e).__name__}: {e}); were they saved by another transformers version?"
            ) from e
        return cls(
            loaded.model,
            loaded.spec.model_type,
            loaded.config,
            tokenizer,
            mesh=mesh,
            max_len=max_len,
            raw=raw,
            instruction=instruction,
            image_size=image_size,
        )

    @property
    def dim(self) -> int:
        """Embedding width: the language model's hidden size."""
        return getattr(self.config, "text", self.config).hidden_size

    def featurizer(self, instruction: str | None = None, raw: bool | None = None) -> BackboneFeaturizer:
        """The input processing :meth:`encode` uses for this prompt mode (None: the defaults set at load).

        It is also a data-pipeline ``Featurizer`` with fixed shapes, for training on the same inputs.
        """
        if instruction is None and raw is None:
            instruction, raw = self.instruction, self.raw
        elif instruction is None and not raw:
            instruction = self.instruction
        mode = (instruction, bool(raw))
        if mode not in self._featurizers:
            self._featurizers[mode] = self.spec.featurizer(
                self.config, self.tokenizer, max_len=self.max_len, raw=bool(raw), instruction=instruction
            )
        return self._featurizers[mode]

    @property
    def _rows_multiple(self) -> int:
        """Batch rows must split evenly over the mesh axes that carry the batch."""
        return math.prod(self.mesh.shape[axis] for axis in LOGICAL_RULES["batch"] or ())

    def encode(
        self,
        texts: str | Sequence[str | None] | None = None,
        images: ImageSource | Sequence[ImageSource | None] | None = None,
        instruction: str | None = None,
        *,
        raw: bool | None = None,
        batch_size: int = 32,
        progress: bool | None = None,
    ) -> np.ndarray:
        """Embed inputs; returns (N, dim) float32 L2-normalised rows, in input order.

        Args:
          texts: N texts (None entries: image-only rows), or None for images alone.
          images: N images as PIL images, (H, W, 3) uint8 arrays or file paths (None entries:
            text-only rows), or None for texts alone. With both, row i is (texts[i], images[i]).
          instruction: an MMEB-style instruction applied to every row (``{text}`` marks the text;
            the image placeholder is added for rows with an image when it is missing).
          raw: use the texts exactly as given, no template. None: the default set at load.
          batch_size: most rows per forward pass (rounded up to a multiple of the data devices).
          progress: show a progress bar; None shows one when there is more than one batch.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        rows = _rows(texts, images)
        featurizer = self.featurizer(instruction, raw)
        planned, truncated = self._plan(featurizer, rows)
        multiple = self._rows_multiple
        batch_size = -(-batch_size // multiple) * multiple
        batches = [
            group[start : start + batch_size]
            for group in planned
            for start in range(0, len(group), batch_size)
        ]
        if truncated:
            logger.warning(
                "%d of %d texts were longer than max_len=%d tokens and were shortened",
                truncated,
                len(rows),
                self.max_len,
            )
        out = np.zeros((len(rows), self.dim), np.float32)
        show = len(batches) > 1 if progress is None else progress
        with tqdm(total=len(rows), desc="encode", unit="input", disable=not show) as bar:
            for batch in batches:
                out[[p.index for p in batch]] = self._embed_batch(featurizer, batch, batch_size)
                bar.update(len(batch))
        return out

    def _plan(
        self, featurizer: BackboneFeaturizer, rows: list[tuple[str | None, ImageSource | None]]
    ) -> tuple[list[list[_Planned]], int]:
        """Token ids of every row, split into text-only and image rows, each sorted by length."""
        text_rows: list[_Planned] = []
        image_rows: list[_Planned] = []
        truncated = 0
        for index, (text, image) in enumerate(rows):
            tokens = (
                None
                if image is None
                else featurizer.num_image_tokens(*_image_size(image, index, self.image_size))
            )
            try:
                ids, cut = featurizer.token_ids(text, tokens)
            except ValueError as e:
                raise InputError(index, str(e)) from e
            truncated += cut
            (text_rows if image is None else image_rows).append(_Planned(index, ids, image, tokens))
        groups = [sorted(group, key=lambda p: len(p.ids)) for group in (text_rows, image_rows)]
        return [group for group in groups if group], truncated

    def _embed_batch(
        self, featurizer: BackboneFeaturizer, batch: list[_Planned], batch_size: int
    ) -> np.ndarray:
        images = []
        for p in batch:
            if p.image is None:
                images.append(None)
                continue
            arrays, tokens = featurizer.process_image(_open_image(p.image, p.index, self.image_size))
            if tokens != p.image_tokens:  # the file changed between reading its header and its pixels
                raise InputError(p.index, f"image has {tokens} tokens, {p.image_tokens} were planned")
            images.append(arrays)
        arrays = featurizer.collate([p.ids for p in batch], images)
        rows = _padded_rows(len(batch), batch_size, self._rows_multiple)
        # Padding rows repeat the last real one (a fully masked row could make NaNs); they are dropped.
        arrays = {k: np.concatenate([v, np.repeat(v[-1:], rows - len(v), axis=0)]) for k, v in arrays.items()}
        with jax.set_mesh(self.mesh):
            placed = {k: jax.device_put(v, batch_sharding(self.mesh, v.shape)) for k, v in arrays.items()}
            return np.asarray(self._forward(self._state, placed))[: len(batch)]

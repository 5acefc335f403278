"""`UniME`: load a backbone and embed texts, images or image+text pairs.

    from unime_jax import UniME

    model = UniME.load("path/to/UniME-LLaVA-1.6-7B")        # HF directory or converted checkpoint
    texts = model.encode(texts=["a dog on a beach", "a red car"])
    images = model.encode(images=["dog.jpg", "car.png"])
    scores = texts @ images.T                                # cosine similarities

Embeddings are the final-norm hidden state of each prompt's last token, L2-normalised (float32).

Batching: inputs are tokenised first (images only have their headers read), then grouped into
text-only and image batches, sorted by length and padded to one of a few bucketed lengths and to
a few row counts, so that a handful of compiled programs serve any input. Image rows are then
decoded and featurised (once each) in a thread pool, a window of batches ahead of the device, and
regrouped within their window by real tile count, so that CLIP runs on few padded tile slots.
The forward pass is one `jax.jit` function per model, with the parameters as an argument
(compilations are shared across calls and the weights are not baked into the program); batch rows
are split over the mesh's data axes. Compiled programs are also kept on disk across processes
(:func:`enable_compilation_cache`). Single-process only: each call runs on the local devices of
the mesh.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from PIL import Image

from unime_jax.backbones import spec_for
from unime_jax.model_io import MODEL_FILE, load_model
from unime_jax.models.pooling import embed
from unime_jax.processing.featurizer import Arrays, BackboneFeaturizer
from unime_jax.processing.images import DECODE_ERRORS, ImageInput, resize_square
from unime_jax.progress import progress_bar
from unime_jax.sharding import LOGICAL_RULES, batch_sharding, make_mesh

__all__ = [
    "COMPILATION_CACHE_ENV",
    "BadInput",
    "Encoded",
    "ImageSource",
    "InputError",
    "UniME",
    "enable_compilation_cache",
]

logger = logging.getLogger(__name__)

# bytes: an encoded image file's contents (e.g. images stored inside a parquet file).
ImageSource = Image.Image | np.ndarray | str | os.PathLike | bytes

# "0" (or false/off/no) turns the persistent compilation cache off; a path moves it there.
COMPILATION_CACHE_ENV = "UNIME_JAX_COMPILATION_CACHE"
# LRU-trimmed beyond this: an executable of a 7B backbone is tens of MB, one per batch shape.
_CACHE_MAX_BYTES = 8 << 30
# Image rows are regrouped by tile count within this many batches' worth of rows; two windows are
# held at once (the one on the device and the one being featurised), which bounds host memory.
_WINDOW_BATCHES = 2
_T = TypeVar("_T")


class InputError(ValueError):
    """One input cannot be embedded; `index` is its position in the encode call (or stream chunk)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"input {index}: {message}")
        self.index = index
        self.message = message


@dataclass(frozen=True)
class BadInput:
    """A row of :meth:`UniME.encode_stream` already known to be bad (e.g. an unreadable record):
    it gets a NaN row and this message, like a row the model refuses."""

    message: str


Row = tuple[str | None, ImageSource | None] | BadInput


@dataclass(frozen=True)
class Encoded:
    """One chunk of :meth:`UniME.encode_stream`: (n, dim) float32 embeddings, NaN rows where an
    input failed, the failed inputs' messages by position, and how many texts were shortened."""

    embeddings: np.ndarray
    errors: dict[int, str]
    truncated: int = 0


def _cache_dir_from_env() -> Path | None:
    value = os.environ.get(COMPILATION_CACHE_ENV, "").strip()
    if value.lower() in {"0", "false", "off", "no"}:
        return None
    if value and value.lower() not in {"1", "true", "on", "yes"}:
        return Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unime_jax" / "jax"


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Keep compiled programs on disk, so a later process skips recompiling the same batch shapes.

    ``directory`` None: ``$UNIME_JAX_COMPILATION_CACHE`` if it names a directory, else
    ``$XDG_CACHE_HOME/unime_jax/jax`` (``~/.cache/unime_jax/jax``); ``UNIME_JAX_COMPILATION_CACHE=0``
    turns it off. A cache directory already configured in JAX (``jax_compilation_cache_dir``) is
    kept. Programs that compile in under a second (JAX's ``jax_persistent_cache_min_compile_time_secs``)
    are not stored: reading them back would not be faster. Returns the directory in use, or None.
    """
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    path = Path(directory).expanduser() if directory is not None else _cache_dir_from_env()
    if path is None:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    if jax.config.jax_compilation_cache_max_size == -1:  # JAX's unbounded default; a user's choice stays
        jax.config.update("jax_compilation_cache_max_size", _CACHE_MAX_BYTES)
    return path


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
            with _open_file(source) as image:  # PIL reads the header only until pixels are asked for
                size = image.height, image.width
        except DECODE_ERRORS as e:
            raise InputError(index, f"cannot read image {_describe(source)}: {e}") from e
    return size if resize is None else (resize, resize)


def _open_image(source: ImageSource, index: int, resize: int | None) -> ImageInput:
    if isinstance(source, Image.Image | np.ndarray):
        return source if resize is None else resize_square(source, resize)
    try:
        with _open_file(source) as image:
            image.load()  # decode now, so a corrupt file is reported here, with its index
            return image.convert("RGB") if resize is None else resize_square(image, resize)
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


def _pad_rows(arrays: Arrays, rows: int) -> Arrays:
    # Padding rows repeat the last real one (a fully masked row could make NaNs); they are dropped.
    return {k: np.concatenate([v, np.repeat(v[-1:], rows - len(v), axis=0)]) for k, v in arrays.items()}


def _forward(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
    model = nnx.merge(graphdef, state)
    return embed(model(**batch), batch["attention_mask"])


def _ahead(items: Iterator[_T], depth: int = 1) -> Iterator[_T]:
    """``items``, pulled ``depth`` ahead of the consumer: pulling one starts its background work,
    so item k+1's work runs while the consumer is busy with item k."""
    buffer = deque(itertools.islice(items, depth))
    for item in items:
        buffer.append(item)
        yield buffer.popleft()
    yield from buffer


@dataclass(frozen=True)
class _Planned:
    index: int  # position in the chunk (the encode call)
    ids: list[int]
    image: ImageSource | None
    image_tokens: int | None  # planned from the image's header size


@dataclass(frozen=True)
class _Plan:
    """One chunk, tokenised: its output (filled in as batches finish) and its non-empty row groups,
    text-only rows and image rows, each sorted by length."""

    out: Encoded
    groups: list[list[_Planned]]


@dataclass(frozen=True)
class _Window:
    """Consecutive rows of one group, their images being featurised (None for text-only rows)."""

    out: Encoded
    rows: list[_Planned]
    images: list[Future[Arrays] | None]


@dataclass(frozen=True)
class _Batch:
    out: Encoded
    indices: list[int]  # positions in the chunk
    arrays: Arrays  # padded to the batch's row count


@dataclass(frozen=True)
class _Running:
    batch: _Batch
    result: jax.Array  # dispatched, maybe not computed yet


@dataclass(frozen=True)
class _ChunkEnd:
    """Every batch of the chunk before this marker has been dispatched."""

    out: Encoded


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
        compilation_cache: bool = True,
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
          compilation_cache: keep compiled programs on disk (:func:`enable_compilation_cache`;
            ``UNIME_JAX_COMPILATION_CACHE=0`` turns it off too).
        """
        if compilation_cache:
            enable_compilation_cache()
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
        workers: int | None = None,
    ) -> np.ndarray:
        """Embed inputs; returns (N, dim) float32 L2-normalised rows, in input order.

        Args:
          texts: N texts (None entries: image-only rows), or None for images alone.
          images: N images as PIL images, (H, W, 3) uint8 arrays, file paths or encoded bytes
            (None entries: text-only rows), or None for texts alone. With both, row i is
            (texts[i], images[i]).
          instruction: an MMEB-style instruction applied to every row (``{text}`` marks the text;
            the image placeholder is added for rows with an image when it is missing).
          raw: use the texts exactly as given, no template. None: the default set at load.
          batch_size: most rows per forward pass (rounded up to a multiple of the data devices).
          progress: show a progress bar; None shows one when there is more than one batch.
          workers: threads that decode and featurise images (default: up to 8, one per CPU).

        Raises :class:`InputError` for the first input that cannot be embedded.
        """
        rows = _rows(texts, images)
        show = len(rows) > batch_size if progress is None else progress
        with progress_bar(total=len(rows), desc="encode", unit="input", disable=not show) as bar:
            (encoded,) = self.encode_stream(
                [rows], instruction, raw=raw, batch_size=batch_size, workers=workers, on_rows=bar.update
            )
        if encoded.truncated:
            logger.warning(
                "%d of %d texts were longer than max_len=%d tokens and were shortened",
                encoded.truncated,
                len(rows),
                self.max_len,
            )
        return encoded.embeddings

    def encode_stream(
        self,
        chunks: Iterable[Sequence[Row]],
        instruction: str | None = None,
        *,
        raw: bool | None = None,
        batch_size: int = 32,
        skip_bad: bool = False,
        workers: int | None = None,
        on_rows: Callable[[int], None] | None = None,
    ) -> Iterator[Encoded]:
        """Embed chunks of ``(text, image)`` rows (or :class:`BadInput`), yielding one
        :class:`Encoded` per chunk, in order, as soon as its last batch is done.

        Each chunk is batched like one :meth:`encode` call. Work overlaps across batches and chunks:
        the next chunk is tokenised, and the next window of images decoded and featurised in
        ``workers`` threads, while the device runs the current batches; a batch is dispatched
        before the previous one's result is fetched. ``chunks`` is read one chunk ahead.

        Args:
          skip_bad: give an input that cannot be embedded a NaN row and its message in
            ``Encoded.errors``; otherwise raise :class:`InputError` (``index``: its position in its
            chunk) for the first one.
          on_rows: called with the number of rows each finished batch (and each chunk's failed
            rows) accounts for, e.g. a progress bar's ``update``.
          instruction, raw, batch_size, workers: as in :meth:`encode`.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        featurizer = self.featurizer(instruction, raw)
        multiple = self._rows_multiple
        batch_size = -(-batch_size // multiple) * multiple
        pool = ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1), thread_name_prefix="featurize")
        try:
            plans = _ahead(pool.submit(self._plan, featurizer, chunk, skip_bad) for chunk in chunks)
            windows = _ahead(self._windows(featurizer, plans, batch_size, pool))
            batches = self._batches(featurizer, windows, batch_size, skip_bad)
            yield from self._run(batches, on_rows or (lambda _: None))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _plan(self, featurizer: BackboneFeaturizer, rows: Sequence[Row], skip_bad: bool) -> _Plan:
        """Token ids of every row (images: from their header sizes), split into text-only and image
        rows, each sorted by length; rows that cannot be planned are recorded (or raised)."""
        text_rows: list[_Planned] = []
        image_rows: list[_Planned] = []
        errors: dict[int, str] = {}
        truncated = 0
        for index, row in enumerate(rows):
            try:
                if isinstance(row, BadInput):
                    raise InputError(index, row.message)
                planned, cut = self._plan_row(featurizer, index, *row)
            except InputError as e:
                if not skip_bad:
                    raise
                errors[index] = e.message
                continue
            truncated += cut
            (text_rows if planned.image is None else image_rows).append(planned)
        out = Encoded(np.full((len(rows), self.dim), np.nan, np.float32), errors, truncated)
        groups = [sorted(group, key=lambda p: len(p.ids)) for group in (text_rows, image_rows)]
        return _Plan(out, [group for group in groups if group])

    def _plan_row(
        self, featurizer: BackboneFeaturizer, index: int, text: str | None, image: ImageSource | None
    ) -> tuple[_Planned, bool]:
        tokens = None
        if image is not None:
            tokens = featurizer.num_image_tokens(*_image_size(image, index, self.image_size))
        try:
            ids, cut = featurizer.token_ids(text, tokens)
        except ValueError as e:
            raise InputError(index, str(e)) from e
        return _Planned(index, ids, image, tokens), cut

    def _windows(
        self,
        featurizer: BackboneFeaturizer,
        plans: Iterator[Future[_Plan]],
        batch_size: int,
        pool: ThreadPoolExecutor,
    ) -> Iterator[_Window | _ChunkEnd]:
        """Each chunk's groups cut into windows, their images submitted to the pool as each window
        is pulled; a marker after each chunk."""
        size = _WINDOW_BATCHES * batch_size
        for future in plans:
            plan = future.result()
            for group in plan.groups:
                for start in range(0, len(group), size):
                    rows = group[start : start + size]
                    images = [
                        None if p.image is None else pool.submit(self._featurize_image, featurizer, p)
                        for p in rows
                    ]
                    yield _Window(plan.out, rows, images)
            yield _ChunkEnd(plan.out)

    def _featurize_image(self, featurizer: BackboneFeaturizer, planned: _Planned) -> Arrays:
        """Decode the image (the only time it is) and featurise it."""
        image = _open_image(planned.image, planned.index, self.image_size)
        arrays, tokens = featurizer.process_image(image)
        if tokens != planned.image_tokens:  # the file changed between reading its header and its pixels
            raise InputError(planned.index, f"image has {tokens} tokens, {planned.image_tokens} were planned")
        return arrays

    def _batches(
        self,
        featurizer: BackboneFeaturizer,
        windows: Iterator[_Window | _ChunkEnd],
        batch_size: int,
        skip_bad: bool,
    ) -> Iterator[_Batch | _ChunkEnd]:
        """Each window's rows, sorted by (real tile count, length), collated into batches."""
        for window in windows:
            if isinstance(window, _ChunkEnd):
                yield window
                continue
            rows: list[tuple[int, _Planned, Arrays | None]] = []  # (tiles, row, image arrays)
            for planned, future in zip(window.rows, window.images, strict=True):
                try:
                    arrays = None if future is None else future.result()
                except InputError as e:
                    if not skip_bad:
                        raise
                    window.out.errors[e.index] = e.message
                    continue
                rows.append((0 if arrays is None else featurizer.inputs.num_tiles(arrays), planned, arrays))
            rows.sort(key=lambda r: (r[0], len(r[1].ids)))
            for start in range(0, len(rows), batch_size):
                chosen = rows[start : start + batch_size]
                arrays = featurizer.collate([p.ids for _, p, _ in chosen], [a for _, _, a in chosen])
                padded = _pad_rows(arrays, _padded_rows(len(chosen), batch_size, self._rows_multiple))
                yield _Batch(window.out, [p.index for _, p, _ in chosen], padded)

    def _run(self, items: Iterator[_Batch | _ChunkEnd], on_rows: Callable[[int], None]) -> Iterator[Encoded]:
        """Dispatch each batch, then collect what came before it: the device always has the next
        batch queued while the host fetches a result, writes it out and prepares the batch after."""
        in_flight: deque[_Running | _ChunkEnd] = deque()
        for item in items:
            if isinstance(item, _ChunkEnd):
                in_flight.append(item)
                continue
            running = _Running(item, self._dispatch(item.arrays))
            while in_flight:
                yield from self._collect(in_flight.popleft(), on_rows)
            in_flight.append(running)
        while in_flight:
            yield from self._collect(in_flight.popleft(), on_rows)

    def _dispatch(self, arrays: Arrays) -> jax.Array:
        with jax.set_mesh(self.mesh):
            placed = {k: jax.device_put(v, batch_sharding(self.mesh, v.shape)) for k, v in arrays.items()}
            return self._forward(self._state, placed)

    @staticmethod
    def _collect(item: _Running | _ChunkEnd, on_rows: Callable[[int], None]) -> Iterator[Encoded]:
        if isinstance(item, _ChunkEnd):
            on_rows(len(item.out.errors))
            yield item.out
            return
        batch = item.batch
        batch.out.embeddings[batch.indices] = np.asarray(item.result)[: len(batch.indices)]
        on_rows(len(batch.indices))

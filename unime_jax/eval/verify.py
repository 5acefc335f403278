"""``python -m convert verify``: our embeddings against transformers' on the same checkpoint.

A few fixed inputs (two texts, two synthetic images of different shapes and an image with an
instruction) are featurized once by our featurizer; the same token ids and pixels go to our model
(``UniME``, from the converted checkpoint or the HF directory converted on the fly) and to the
PyTorch model of the HF directory (``BackboneSpec.reference``). Each row's two embeddings are
compared by cosine against a tolerance that depends on the compute dtype: in float32 the two
frameworks agree to rounding; in 16-bit formats each adds its own rounding noise.

The featurizer itself (ids and pixels against the HF processors) is checked by the test suite;
this checks the weights and the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from unime_jax.backbones import spec_for
from unime_jax.cli_errors import usage_errors
from unime_jax.embedder import UniME
from unime_jax.model_io import MODEL_FILE
from unime_jax.processing.prompts import IMAGE_TAG

__all__ = ["ROWS", "TOLERANCE", "Report", "RowResult", "VerifyRow", "main", "verify"]

# Largest allowed 1 - cosine per compute dtype. float32: both frameworks match to ~1e-6 in the
# hidden states. bfloat16: on random full-size LLaVA-1.6 weights the two frameworks' bf16 embeddings
# met at 0.98 (BENCHMARKS.md), and trained weights are better conditioned; a wrong tensor moves a
# row far beyond these.
TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}
INSTRUCTION = IMAGE_TAG + "\nRepresent the given image with the following question: {text}"


@dataclass(frozen=True)
class VerifyRow:
    name: str
    text: str | None
    image: tuple[int, int, int] | None  # (seed, height, width) of a synthetic image
    instruction: str | None = None


ROWS = (
    VerifyRow("text: short caption", "A red circle above a blue square.", None),
    VerifyRow("text: sentence", "The quick brown fox jumps over the lazy dog by the river.", None),
    VerifyRow("image: 336x336", None, (0, 336, 336)),
    VerifyRow("image: 300x500", None, (1, 300, 500)),
    VerifyRow("image + instruction", "What colour is the largest shape?", (2, 400, 300), INSTRUCTION),
)


def synthetic_image(seed: int, height: int, width: int) -> Image.Image:
    """A deterministic picture with smooth gradients and coloured blocks (no files needed)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    gradient = np.stack([x, y, 1 - x * y], axis=-1)
    blocks = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
        (width, height), Image.NEAREST
    )
    pixels = 0.5 * 255 * gradient + 0.5 * np.asarray(blocks, np.float64)
    return Image.fromarray(pixels.round().astype(np.uint8))


@dataclass(frozen=True)
class RowResult:
    index: int
    name: str
    cosine: float
    passed: bool


@dataclass(frozen=True)
class Report:
    model_type: str
    dtype: str
    tolerance: float  # largest allowed 1 - cosine
    rows: tuple[RowResult, ...]

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    def lines(self) -> list[str]:
        out = [f"{self.model_type}, {self.dtype}: pass when cosine >= {1 - self.tolerance:.6f}"]
        out += [
            f"  row {r.index}  {r.name:<22} cosine {r.cosine:.6f}  {'ok' if r.passed else 'FAIL'}"
            for r in self.rows
        ]
        failed = [r for r in self.rows if not r.passed]
        if failed:
            named = ", ".join(f"row {r.index} ({r.name}: {r.cosine:.6f})" for r in failed)
            out.append(f"FAIL: our embeddings differ from transformers' at {named}")
        else:
            out.append(f"PASS: all {len(self.rows)} rows agree")
        return out


def _stored_dtype(path: Path) -> str | None:
    """The dtype an HF directory's config.json records (v4 ``torch_dtype``, v5 ``dtype``); None for
    a converted checkpoint, whose loader keeps its own."""
    if (path / MODEL_FILE).is_file():
        return None
    config = json.loads((path / "config.json").read_text())
    return config.get("torch_dtype") or config.get("dtype") or "float32"


def _check_dtype(dtype: str) -> str:
    if dtype not in TOLERANCE:
        raise ValueError(f"verify compares in {', '.join(TOLERANCE)}, not {dtype!r}; pass --dtype")
    return dtype


def verify(hf_dir: Path, ckpt: Path | None = None, *, dtype: str | None = None, mesh=None) -> Report:
    """Embed :data:`ROWS` with our model (``ckpt``, or ``hf_dir`` converted) and with transformers'
    model of ``hf_dir``; ``dtype`` is both frameworks' compute and parameter dtype (default: the
    stored one)."""
    hf_dir = Path(hf_dir)
    # Everything that can be wrong with the arguments fails here, before any embedding (exit 2).
    with usage_errors(ValueError, OSError):
        if not (hf_dir / "config.json").is_file():
            raise FileNotFoundError(f"--hf-dir {hf_dir} is not an HF model directory (no config.json)")
        ours_path = Path(ckpt) if ckpt is not None else hf_dir
        dtype = dtype or _stored_dtype(ours_path)  # None: the converted checkpoint's own
        if dtype is not None:
            _check_dtype(dtype)
        ours = UniME.load(ours_path, mesh=mesh, dtype=dtype, param_dtype=dtype, progress=False)
        dtype = _check_dtype(ours.config.dtype)
        spec = spec_for(ours.model_type)
        if spec.reference is None:
            raise ValueError(f"convert verify has no PyTorch reference for model type {ours.model_type!r}")
    # Loading the reference can fail like any run (a damaged file, memory): not a usage error.
    reference = spec.reference(hf_dir, ours.config, dtype)
    results = []
    for index, row in enumerate(ROWS):
        image = None if row.image is None else synthetic_image(*row.image)
        featurizer = ours.featurizer(instruction=row.instruction)
        arrays, num_tokens = (None, None) if image is None else featurizer.process_image(image)
        ids, _ = featurizer.token_ids(row.text, num_tokens)
        theirs = reference(ids, arrays)
        mine = ours.encode(texts=[row.text], images=[image], instruction=row.instruction)[0]
        cosine = float(np.dot(mine, theirs) / np.linalg.norm(theirs))
        results.append(RowResult(index, row.name, cosine, 1 - cosine <= TOLERANCE[dtype]))
    return Report(ours.model_type, dtype, TOLERANCE[dtype], tuple(results))


def main(hf_dir: Path, ckpt: Path | None = None, dtype: str | None = None) -> int:
    """``python -m convert verify``'s body: prints the per-row table; 0 when every row passes, else 1."""
    report = verify(hf_dir, ckpt, dtype=dtype)
    print("\n".join(report.lines()))
    return 0 if report.passed else 1

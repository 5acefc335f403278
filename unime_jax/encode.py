"""Embed a JSONL file of texts and images with a UniME model; write the embeddings as .npy.

    python -m unime_jax.encode --model DIR --input inputs.jsonl --out embeddings.npy

See `--help` (the parser's epilog) for the input format and the error handling.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from unime_jax.cli_args import model_cli_parser
from unime_jax.processing.images import DECODE_ERRORS

EPILOG = """\
input format:
  One JSON object per line: {"text": STRING or null, "image": PATH or null}. A row needs a text,
  an image, or both (an image with its text, e.g. a question about it). Blank lines are ignored;
  every other line is one row of the output, in order. Relative image paths are resolved against
  --image-root (default: the directory of the input file).

prompts:
  By default texts and images are wrapped in UniME's "Summary above ... in one word" templates
  for the model's backbone; a row with both a text and an image then needs --instruction or --raw.
  --instruction applies an MMEB-style instruction to every row: "{text}" marks where the row's text
  goes (otherwise it is appended after a space), and rows with an image get the image placeholder
  "<|image_1|>" prepended when the instruction lacks it (it is mapped to "<image>" for LLaVA).
  --raw feeds each text exactly as written (texts may contain "<|image_1|>" themselves).

output:
  A float32 array of shape (rows, hidden size), L2-normalised: cosine similarity is a dot product.

errors:
  A line that is not a JSON object with "text"/"image", an image that is missing or cannot be
  decoded, or an input that cannot be featurized stops the run with the line number and path,
  before anything is written. With --skip-bad such rows become NaN rows instead and are listed
  on stderr. Text-only rows longer than --max-len tokens are shortened (the template is kept)
  and counted in a warning; rows with an image are never shortened.

exit status:
  0 on success, 1 on a bad line (without --skip-bad), 2 on a usage error.

devices:
  The model is placed on all local devices, batch rows split over them (single process).
"""



@dataclass(frozen=True)
class Row:
    line: int  # 1-based line number in the input file
    text: str | None
    image: Path | None


class BadLine(ValueError):
    def __init__(self, path: Path, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = model_cli_parser(
        "python -m unime_jax.encode",
        "Embed texts, images and image+text pairs from a JSONL file with a UniME model.",
        EPILOG,
        "e.g. the exported <workdir>/export/hf",
    )
    parser.add_argument("--input", required=True, type=Path, help="JSONL file, one input per line")
    parser.add_argument("--out", required=True, type=Path, help=".npy file to write (N, D) float32 to")
    parser.add_argument(
        "--image-root", type=Path, help="base of relative image paths (default: the input's directory)"
    )
    parser.add_argument(
        "--raw", action="store_true", help="use texts exactly as given, without a prompt template"
    )
    parser.add_argument(
        "--instruction", help="MMEB-style instruction for every row; '{text}' marks the row's text"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default: 32)")
    parser.add_argument(
        "--max-len",
        type=int,
        default=512,
        help="most text tokens of a text-only row; longer texts are shortened (default: 512)",
    )
    parser.add_argument("--dtype", help="compute dtype, e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument(
        "--skip-bad", action="store_true", help="write NaN rows for bad lines instead of stopping"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.raw and args.instruction is not None:
        parser.error("--raw and --instruction exclude each other")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def _check_image(path: Path) -> None:
    """Decode the whole image, so a truncated or corrupt file is found before the model runs."""
    with Image.open(path) as image:
        image.load()


def parse_line(raw: str, number: int, source: Path, image_root: Path) -> Row:
    """One JSONL line → a Row whose image exists and decodes; raises BadLine otherwise."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadLine(source, number, f"not valid JSON: {e}") from e
    if not isinstance(record, dict):
        raise BadLine(
            source, number, f'expected a JSON object {{"text": ..., "image": ...}}, got {raw.strip()!r}'
        )
    unknown = sorted(set(record) - {"text", "image"})
    if unknown:
        raise BadLine(source, number, f"unknown key(s) {unknown}; a row has 'text' and/or 'image'")
    text, image = record.get("text"), record.get("image")
    if text is not None and not isinstance(text, str):
        raise BadLine(source, number, f"'text' must be a string or null, got {text!r}")
    if image is not None and not isinstance(image, str):
        raise BadLine(source, number, f"'image' must be a path string or null, got {image!r}")
    if not text and not image:
        raise BadLine(source, number, "needs a non-empty 'text' or an 'image'")
    path = None
    if image:
        path = image_root / image
        try:
            _check_image(path)
        except FileNotFoundError as e:
            raise BadLine(source, number, f"image {path} does not exist") from e
        except DECODE_ERRORS as e:
            raise BadLine(source, number, f"image {path} cannot be decoded: {e}") from e
    return Row(number, text or None, path)


def read_rows(source: Path, image_root: Path) -> tuple[list[Row | None], list[str]]:
    """Rows in file order (None for bad lines) and the bad lines' messages."""
    rows: list[Row | None] = []
    bad: list[str] = []
    with source.open(encoding="utf-8") as file:
        for number, raw in enumerate(file, start=1):
            if not raw.strip():
                continue
            try:
                rows.append(parse_line(raw, number, source, image_root))
            except BadLine as e:
                rows.append(None)
                bad.append(str(e))
    return rows, bad


def _save(out: Path, array: np.ndarray) -> None:
    """Write through a temporary file, so a failed run never leaves a partial .npy behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with partial.open("wb") as file:
        np.save(file, array)
    os.replace(partial, out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.input.is_file():
        print(f"error: input file {args.input} does not exist", file=sys.stderr)
        return 2
    rows, bad = read_rows(args.input, args.image_root or args.input.parent)
    if bad and not args.skip_bad:
        print(f"error: {bad[0]}", file=sys.stderr)
        if len(bad) > 1:
            print(f"({len(bad) - 1} more bad line(s); --skip-bad writes NaN rows for them)", file=sys.stderr)
        return 1

    from unime_jax.embedder import InputError, UniME  # jax is imported only once the input is known good

    model = UniME.load(
        args.model,
        dtype=args.dtype,
        max_len=args.max_len,
        raw=args.raw,
        instruction=args.instruction,
        progress=not args.no_progress,
    )
    out = np.full((len(rows), model.dim), np.nan, np.float32)
    good = [i for i, row in enumerate(rows) if row is not None]
    while good:
        chosen = [rows[i] for i in good]
        try:
            out[good] = model.encode(
                texts=[row.text for row in chosen],
                images=[row.image for row in chosen],
                batch_size=args.batch_size,
                progress=None if not args.no_progress else False,
            )
            break
        except InputError as e:
            row = chosen[e.index]
            where = f"{args.input}:{row.line}" + (f" (image {row.image})" if row.image else "")
            message = f"{where}: {e.message}"
            if not args.skip_bad:
                print(f"error: {message}", file=sys.stderr)
                return 1
            bad.append(message)
            good.remove(good[e.index])  # inputs are checked before any forward pass: retry without it
    _save(args.out, out)
    for message in bad:
        print(f"skipped: {message}", file=sys.stderr)
    print(
        f"wrote {out.shape[0]}x{out.shape[1]} embeddings to {args.out}"
        + (f" ({len(bad)} bad row(s) are NaN)" if bad else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

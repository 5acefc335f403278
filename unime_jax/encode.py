"""Embed texts and images from a JSONL file, a parquet file or an image folder with a UniME model;
write the embeddings as .npy and their ids beside it, resumably.

    python -m unime_jax.encode --model DIR --input inputs.jsonl --out embeddings.npy
    python -m unime_jax.encode --model DIR --input photos/ --out photos.npy

See `--help` (the parser's epilog) for the input formats, the output and the error handling.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unime_jax.cli_args import model_cli_parser
from unime_jax.cli_errors import run
from unime_jax.encode_io import Columns, InputProblem, Output, Row, Table, chunked, open_table
from unime_jax.progress import progress_bar

if TYPE_CHECKING:
    from unime_jax.embedder import UniME

EPILOG = """\
input formats:
  JSONL (any file but .parquet): one JSON object per line,
    {"text": STRING or null, "image": PATH or null}
    plus the id field when --id-column is given. Blank lines are ignored; every other line is one
    row of the output, in order. Ids are the line numbers without --id-column.
  parquet (.parquet): one row per record, from the --text-column and --image-column columns (either
    may be missing); an image is a path, encoded bytes or an HF {"bytes", "path"} struct. Ids are
    the --id-column values, or the row numbers.
  image folder (a directory): every image file under it (recursively, sorted, hidden ones left
    out), each embedded alone; ids are the paths relative to the folder.
  A row needs a text, an image, or both (an image with its text, e.g. a question about it).
  Relative image paths are resolved against --image-root (default: the input file's directory).

prompts:
  By default texts and images are wrapped in UniME's "Summary above ... in one word" templates
  for the model's backbone; a row with both a text and an image then needs --instruction or --raw.
  --instruction applies an MMEB-style instruction to every row: "{text}" marks where the row's text
  goes (otherwise it is appended after a space), and rows with an image get the image placeholder
  "<|image_1|>" prepended when the instruction lacks it (it is mapped to "<image>" for LLaVA).
  --raw feeds each text exactly as written (texts may contain "<|image_1|>" themselves).

output:
  OUT: a float32 array of shape (rows, hidden size), L2-normalised (cosine similarity is a dot
  product), and OUT's ids one per line beside it (emb.npy -> emb.ids.txt). Both are written into
  OUT.unfinished/ (a memory-mapped .npy, chunk by chunk) and renamed into place when every row is
  done, so OUT never exists half-written.

resuming:
  A run that is killed (or interrupted with Ctrl-C) leaves OUT.unfinished/; the same command
  continues after the last finished chunk (--chunk-rows rows each). Another model, input or
  prompt setting starts over.

errors:
  A line that is not UTF-8 or not a JSON object with the expected fields, or whose image file is
  missing, stops the run with its line number before the model is loaded. An image that cannot be
  decoded, or an input that cannot be featurized, stops it when its chunk is reached. A failed run
  removes OUT.unfinished/. With --skip-bad such rows become NaN rows instead and are listed on
  stderr. Text-only rows longer than --max-len tokens are shortened (the template is kept) and
  counted in a warning; rows with an image are never shortened.

exit status:
  0 on success, 1 on a bad row (without --skip-bad) or a full disk (the space for the embeddings is
  claimed before the first row is embedded), 2 on a usage error (unreadable input, unwritable --out,
  unusable model), 130 when interrupted (resumable). --debug (or UNIME_JAX_DEBUG=1) adds the
  traceback to an error.

performance:
  Images are decoded once, in --workers threads, while the device runs the batches before them.
  Compiled programs are cached on disk (~/.cache/unime_jax/jax, or $XDG_CACHE_HOME/unime_jax/jax;
  UNIME_JAX_COMPILATION_CACHE=DIR moves it, =0 or --no-compilation-cache turns it off).

devices:
  The model is placed on all local devices, batch rows split over them (single process).
"""


class _Failure(Exception):
    """The run cannot go on: a one-line message and the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = model_cli_parser(
        "python -m unime_jax.encode",
        "Embed texts, images and image+text pairs from a JSONL file, a parquet file or an image "
        "folder with a UniME model.",
        EPILOG,
        "e.g. the exported <workdir>/export/hf",
    )
    parser.add_argument(
        "--input", required=True, type=Path, help="JSONL file, .parquet file or folder of images"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help=".npy file to write (N, D) float32 to; ids go beside it"
    )
    parser.add_argument(
        "--image-root", type=Path, help="base of relative image paths (default: the input's directory)"
    )
    parser.add_argument("--id-column", help="JSONL field or parquet column of the row ids (unique)")
    parser.add_argument("--text-column", help="JSONL field or parquet column of the texts (default: text)")
    parser.add_argument("--image-column", help="JSONL field or parquet column of the images (default: image)")
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
        "--skip-bad", action="store_true", help="write NaN rows for bad rows instead of stopping"
    )
    parser.add_argument(
        "--chunk-rows",
        type=int,
        default=2048,
        help="rows sorted and batched together, and saved at once: what a killed run may redo (default: 2048)",
    )
    parser.add_argument(
        "--workers", type=int, help="threads that decode and featurise images (default: up to 8, one per CPU)"
    )
    parser.add_argument(
        "--no-compilation-cache", action="store_true", help="do not keep compiled programs on disk"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.raw and args.instruction is not None:
        parser.error("--raw and --instruction exclude each other")
    for flag in ("batch_size", "chunk_rows", "workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    columns = (args.id_column, args.text_column, args.image_column)
    if args.input.is_dir() and any(c is not None for c in columns):
        parser.error("--id-column, --text-column and --image-column are for JSONL and parquet inputs")
    return args


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the embeddings depend on: a resumed run must have been started with the same."""
    return {
        "model": str(args.model.resolve()),
        "input": str(args.input.resolve()),
        "image_root": None if args.image_root is None else str(args.image_root.resolve()),
        "columns": [args.id_column, args.text_column, args.image_column],
        "raw": args.raw,
        "instruction": args.instruction,
        "max_len": args.max_len,
        "dtype": args.dtype,
        "skip_bad": args.skip_bad,
    }


def _message(row: Row, error: str) -> str:
    return f"{row.where}: {row.error}" if row.error else f"{row.describe()}: {error}"


def _load(args: argparse.Namespace) -> UniME:
    from unime_jax.embedder import UniME  # jax is imported only once the input is known good

    try:
        return UniME.load(
            args.model,
            dtype=args.dtype,
            max_len=args.max_len,
            raw=args.raw,
            instruction=args.instruction,
            progress=not args.no_progress,
            compilation_cache=not args.no_compilation_cache,
        )
    except (FileNotFoundError, ValueError) as e:
        raise _Failure(f"cannot load --model {args.model}: {e}", 2) from e


def _encode(args: argparse.Namespace, table: Table, output: Output) -> int:
    """Embed the rows after ``output.done`` into ``output``; returns how many texts were shortened."""
    from unime_jax.embedder import BadInput

    model = _load(args)
    output.open(model.dim)
    handed: deque[list[Row]] = deque()  # chunks given to the model, oldest first

    def chunks() -> Iterator[list[Any]]:
        for chunk in chunked(table.rows(output.done), args.chunk_rows):
            handed.append(chunk)
            yield [BadInput(row.error) if row.error else (row.text, row.image) for row in chunk]

    truncated = 0
    with progress_bar(
        total=output.rows, initial=output.done, desc="encode", unit="row", disable=args.no_progress
    ) as bar:
        stream = model.encode_stream(
            chunks(), batch_size=args.batch_size, skip_bad=True, workers=args.workers, on_rows=bar.update
        )
        with closing(stream):  # on a failure its featurising threads stop before the output goes
            for encoded in stream:
                chunk = handed.popleft()
                bad = {i: _message(chunk[i], message) for i, message in sorted(encoded.errors.items())}
                if bad and not args.skip_bad:
                    raise _Failure(next(iter(bad.values())), 1)
                output.write(encoded.embeddings, bad)
                truncated += encoded.truncated
    return truncated


def _finish(output: Output, truncated: int, max_len: int) -> None:
    """Rename the output into place and report what was written and skipped."""
    ids = output.finish()
    for message in output.bad.values():
        print(f"skipped: {message}", file=sys.stderr)
    if truncated:
        print(
            f"warning: {truncated} text(s) were longer than --max-len={max_len} tokens and were shortened",
            file=sys.stderr,
        )
    bad = f" ({len(output.bad)} bad row(s) are NaN)" if output.bad else ""
    print(
        f"wrote {output.rows}x{output.dim} embeddings to {output.out} and their ids to {ids}{bad}",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(lambda: _main(args), debug=args.debug)


def _main(args: argparse.Namespace) -> int:
    columns = Columns(args.text_column or "text", args.image_column or "image", args.id_column)
    try:
        table = open_table(args.input, args.image_root, columns)
    except (InputProblem, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if table.known_bad and not args.skip_bad:
        print(f"error: {_message(table.known_bad[0], '')}", file=sys.stderr)
        if len(table.known_bad) > 1:
            more = len(table.known_bad) - 1
            print(f"({more} more bad row(s); --skip-bad writes NaN rows for them)", file=sys.stderr)
        return 1
    output = Output(args.out, table.ids, _settings(args))
    try:
        note = output.prepare()
    except OSError as e:
        print(f"error: cannot write --out {args.out}: {e}", file=sys.stderr)
        return 2
    if note:
        print(note, file=sys.stderr)
    elif output.done:
        print(f"resuming {output.work}: {output.done} of {output.rows} rows are done", file=sys.stderr)
    try:
        truncated = _encode(args, table, output)
        _finish(output, truncated, args.max_len)
    except _Failure as e:
        output.discard()
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(
            f"interrupted after {output.done} of {output.rows} rows; the same command resumes from there",
            file=sys.stderr,
        )
        return 130
    except BaseException:
        output.discard()
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m unime_jax.teacher``: offline teacher embeddings for stage 1.

Encodes the three columns of the NLI CSV with a sentence-transformers model, L2-normalises, and
writes a float16 store (see :mod:`unime_jax.data.teacher_store`) in chunks. After each chunk the
embeddings are flushed and the manifest's ``rows_done`` is replaced atomically, so a killed run
loses at most one chunk: run the same command again and it continues where it stopped.

torch and sentence-transformers are optional (the ``torch`` extra) and imported only here.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from unime_jax.cli_errors import add_debug_flag, usage_errors
from unime_jax.cli_errors import run as run_cli
from unime_jax.data import teacher_store
from unime_jax.data.errors import DataError
from unime_jax.data.nli import NLI_COLUMNS, NliTable, read_nli_csv

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

_EPILOG = f"""\
The store (--out) holds {teacher_store.MANIFEST_FILE} and {teacher_store.EMBEDDINGS_FILE}
(float16, rows x 3 x dim for the columns {", ".join(NLI_COLUMNS)}). Stage-1 training refuses a store
whose manifest does not match its data file (checksum, rows), teacher, instruction or dimension.

Interrupted runs resume: rerun the same command. A store computed with other arguments is
never overwritten; choose another --out or delete it.

Quick CPU check with a small model (any local sentence-transformers directory works offline):
  HF_HUB_OFFLINE=1 python -m unime_jax.teacher --model ./all-MiniLM-L6-v2 \\
      --data nli_for_simcse.csv --out teacher/minilm

UniME's teacher, NV-Embed-v2 (4096-dim, CC-BY-NC-4.0), on a GPU. It needs its remote code, an EOS
appended to every text and its "Instruct: ...\\nQuery: " prefix; the instruction UniME used is not
published, this is NV-Embed-v2's instruction for semantic similarity:
  python -m unime_jax.teacher --model ./NV-Embed-v2 --name NV-Embed-v2 \\
      --data nli_for_simcse.csv --out teacher/nv-embed-v2 \\
      --instruction $'Instruct: Retrieve semantically similar text.\\nQuery: ' \\
      --trust-remote-code --append-eos --dtype float16 --device cuda --batch-size 64
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unime_jax.teacher",
        description="Compute L2-normalised teacher embeddings of an NLI triplet CSV "
        "(sent0,sent1,hard_neg) for UniME stage-1 distillation. Resumable.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="local sentence-transformers model dir")
    parser.add_argument("--data", required=True, metavar="FILE", help="NLI CSV with sent0,sent1,hard_neg")
    parser.add_argument("--out", required=True, metavar="DIR", help="store directory (created or resumed)")
    parser.add_argument(
        "--instruction",
        default="",
        metavar="TEXT",
        help="prompt prepended to every text (passed as the sentence-transformers prompt, so models "
        "that exclude instruction tokens from pooling do so); recorded in the manifest. Default: none",
    )
    parser.add_argument(
        "--name", metavar="NAME", help="teacher name recorded in the manifest (default: the --model dir name)"
    )
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="texts per forward pass (64)")
    parser.add_argument(
        "--chunk-rows",
        type=int,
        default=4096,
        metavar="N",
        help="rows encoded between checkpoints of progress (4096); a killed run redoes at most one chunk",
    )
    parser.add_argument(
        "--limit", type=int, metavar="N", help="stop after N more rows (split a long job; rerun to continue)"
    )
    parser.add_argument("--device", metavar="DEV", help="torch device, e.g. cuda or cpu (default: auto)")
    parser.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="model weights dtype"
    )
    parser.add_argument("--max-seq-length", type=int, metavar="N", help="override the model's max tokens")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code")
    parser.add_argument("--append-eos", action="store_true", help="append the tokenizer's EOS to every text")
    add_debug_flag(parser)
    return parser


def load_model(args: argparse.Namespace) -> SentenceTransformer:
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise SystemExit(
            f"python -m unime_jax.teacher needs torch and sentence-transformers ({e}); install the "
            "'torch' extra: pip install torch==2.13.0 -e '.[torch]'"
        ) from e
    if not Path(args.model).is_dir():
        raise SystemExit(f"--model {args.model} is not a directory; pass a local sentence-transformers model")
    model = SentenceTransformer(
        args.model,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        model_kwargs={"torch_dtype": getattr(torch, args.dtype)},
    )
    if args.max_seq_length:
        model.max_seq_length = args.max_seq_length
    return model


def embedding_dim(model: SentenceTransformer) -> int:
    # sentence-transformers 6 renamed the method; older releases only have the long name.
    get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = get_dim()
    return int(dim) if dim else int(model.encode(["probe"]).shape[-1])


def _job(args: argparse.Namespace, table: NliTable) -> teacher_store.TeacherManifest:
    return teacher_store.TeacherManifest(
        teacher=args.name or Path(args.model).resolve().name,
        dim=0,  # known once the model is loaded
        instruction=args.instruction,
        rows=len(table.rows),
        data_sha256=table.sha256,
        data_file=table.path.name,
        columns=NLI_COLUMNS,
    )


def encode_rows(
    model: SentenceTransformer, rows: list[tuple[str, str, str]], args: argparse.Namespace
) -> np.ndarray:
    """(len(rows), 3, dim) float16 embeddings, L2-normalised in float32 (whatever the model dtype)."""
    texts = [text for row in rows for text in row]  # row-major: the store's (row, column) order
    if args.append_eos:
        texts = [text + model.tokenizer.eos_token for text in texts]
    vectors = model.encode(
        texts,
        prompt=args.instruction or None,
        batch_size=args.batch_size,
        convert_to_numpy=True,
        show_progress_bar=False,
    ).astype(np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    return vectors.reshape(len(rows), len(NLI_COLUMNS), -1).astype(np.float16)


def run(args: argparse.Namespace) -> teacher_store.TeacherManifest:
    """Compute (or continue) the store; returns the manifest as left on disk.

    A CSV or store that cannot be used is a UsageError (exit 2), found before any row is encoded;
    a DataError while encoding is a failure of the run (exit 1).
    """
    from unime_jax.progress import progress_bar

    with usage_errors(DataError):
        table = read_nli_csv(args.data)
        job = _job(args, table)
        resuming = (Path(args.out) / teacher_store.MANIFEST_FILE).exists()
        if resuming:
            found = teacher_store.read_manifest(args.out)
            # Refuse a different job before spending minutes loading the model; the dim is checked after.
            teacher_store.check_job(args.out, found, job, skip=("dim",))
            if found.complete:
                print(f"{args.out} is already complete ({found.rows} rows); nothing to do.")
                return found
    model = load_model(args)
    job = dataclasses.replace(job, dim=embedding_dim(model))
    with usage_errors(DataError):
        if resuming:
            manifest, embeddings = teacher_store.resume_store(args.out, job)
        else:
            manifest, embeddings = job, teacher_store.create_store(args.out, job)
    stop = manifest.rows if args.limit is None else min(manifest.rows, manifest.rows_done + args.limit)
    with progress_bar(total=manifest.rows, initial=manifest.rows_done, unit="row", desc="teacher") as bar:
        for start in range(manifest.rows_done, stop, args.chunk_rows):
            end = min(start + args.chunk_rows, stop)
            embeddings[start:end] = encode_rows(model, table.rows[start:end], args)
            embeddings.flush()  # data first, then the manifest that vouches for it
            manifest = dataclasses.replace(manifest, rows_done=end)
            teacher_store.write_manifest(args.out, manifest)
            bar.update(end - start)
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.chunk_rows < 1 or (args.limit is not None and args.limit < 1):
        print("error: --batch-size, --chunk-rows and --limit must be positive", file=sys.stderr)
        return 2
    return run_cli(
        lambda: _main(args), debug=args.debug, on_interrupt="interrupted; the same command resumes"
    )


def _main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    manifest = run(args)
    state = (
        "complete" if manifest.complete else f"{manifest.rows_done}/{manifest.rows} rows, rerun to continue"
    )
    print(
        f"{args.out}: {manifest.teacher}, dim {manifest.dim}, {state} ({time.perf_counter() - started:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

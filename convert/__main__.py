"""`python -m convert`: move weights between HuggingFace directories and unime-jax checkpoints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unime_jax.cli_errors import add_debug_flag, run, usage_errors

DESCRIPTION = """\
Convert model weights between HuggingFace (safetensors) and unime-jax (orbax) checkpoints.

  to-jax  reads an HF model directory (config.json + model.safetensors or a sharded
          model.safetensors.index.json, plus tokenizer files) and writes a unime-jax
          checkpoint: params/ (orbax), unime_model.yaml, hf_config.json, tokenizer files.
          Every HF tensor must be used exactly once and every parameter filled; otherwise
          the error lists the missing, unexpected and wrongly shaped tensors.
  to-hf   writes a unime-jax checkpoint back as an HF directory (safetensors, sharded above
          --max-shard-size, and config.json) that transformers loads directly.
  verify  embeds fixed text and image inputs with unime-jax and with transformers' model of an
          HF directory and prints each row's cosine, pass or fail (the step after to-jax).

Supported model types: llava_next (LLaVA-1.6 / UniME-LLaVA-1.6), phi3_v (Phi-3.5-V / UniME-Phi3.5-V),
llava_onevision (LLaVA-OneVision / UniME-LLaVA-OneVision), llama, mistral, phi3, qwen2,
clip_vision_model and siglip_vision_model; transformers 4 and 5 key layouts are both read.
verify covers the embedders: llava_next, phi3_v and llava_onevision.
"""

EPILOG = """\
examples:
  python -m convert to-jax --hf-dir ./Mistral-7B --out ./ckpt/mistral --dtype bfloat16
  python -m convert to-hf --ckpt ./ckpt/mistral --out ./export/mistral --max-shard-size 2GB
  python -m convert verify --hf-dir ./UniME-LLaVA-1.6-7B --ckpt ./ckpt/unime-llava16
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{to-jax,to-hf,verify}")
    to_jax = sub.add_parser("to-jax", help="HF directory -> unime-jax checkpoint", description=DESCRIPTION)
    to_jax.add_argument(
        "--hf-dir", required=True, type=Path, help="HF model directory (local; no hub downloads)"
    )
    to_jax.add_argument("--out", required=True, type=Path, help="new, empty output directory")
    to_jax.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="cast floating-point weights to this dtype (default: keep the stored dtype)",
    )
    to_hf = sub.add_parser("to-hf", help="unime-jax checkpoint -> HF directory", description=DESCRIPTION)
    to_hf.add_argument(
        "--ckpt", required=True, type=Path, help="unime-jax checkpoint directory (from to-jax)"
    )
    to_hf.add_argument("--out", required=True, type=Path, help="new, empty output directory")
    to_hf.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file before splitting into shards with an index (default: 5GB)",
    )
    verify = sub.add_parser(
        "verify",
        help="our embeddings vs transformers' on an HF directory: cosine per row, pass/fail",
        description="Embed a few fixed text and image inputs with unime-jax (--ckpt, or --hf-dir converted "
        "on the fly) and with the PyTorch model of --hf-dir, and print each row's cosine against a "
        "dtype-aware tolerance. Exits 0 when every row passes, 1 when one does not.",
    )
    verify.add_argument("--hf-dir", required=True, type=Path, help="the HF model directory to compare with")
    verify.add_argument(
        "--ckpt", type=Path, help="a converted unime-jax checkpoint (default: convert --hf-dir)"
    )
    verify.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype of both (default: the stored one)",
    )
    add_debug_flag(verify)
    for p in (to_jax, to_hf):
        p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        add_debug_flag(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "verify":
        from unime_jax.eval import verify

        return run(lambda: verify.main(args.hf_dir, args.ckpt, args.dtype), debug=args.debug)
    # Imported here so that --help answers without loading JAX.
    from unime_jax.conversion.to_hf import export_checkpoint
    from unime_jax.conversion.to_jax import convert_hf_dir

    def convert() -> int:
        # Bad inputs (a missing, damaged or unsupported model, a used --out) exit 2; a full or
        # read-only disk exits 1. Either way --out is never left half-written.
        with usage_errors(ValueError, FileNotFoundError, FileExistsError):
            if args.command == "to-jax":
                loaded = convert_hf_dir(
                    args.hf_dir, args.out, param_dtype=args.dtype, progress=not args.no_progress
                )
                print(f"wrote {loaded.spec.model_type} checkpoint ({loaded.config.param_dtype}) to {args.out}")
            else:
                files = export_checkpoint(
                    args.ckpt, args.out, max_shard_size=args.max_shard_size, progress=not args.no_progress
                )
                print(f"wrote {len(files)} safetensors file(s) and config.json to {args.out}")
        return 0

    return run(convert, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())

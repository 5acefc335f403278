"""`python -m convert`: move weights between HuggingFace directories and unime-jax checkpoints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Convert model weights between HuggingFace (safetensors) and unime-jax (orbax) checkpoints.

  to-jax  reads an HF model directory (config.json + model.safetensors or a sharded
          model.safetensors.index.json, plus tokenizer files) and writes a unime-jax
          checkpoint: params/ (orbax), unime_model.yaml, hf_config.json, tokenizer files.
          Every HF tensor must be used exactly once and every parameter filled; otherwise
          the error lists the missing, unexpected and wrongly shaped tensors.
  to-hf   writes a unime-jax checkpoint back as an HF directory (safetensors, sharded above
          --max-shard-size, and config.json) that transformers loads directly.

Supported model types: llava_next (LLaVA-1.6 / UniME-LLaVA-1.6), phi3_v (Phi-3.5-V / UniME-Phi3.5-V),
llama, mistral, phi3 and clip_vision_model; transformers 4 and 5 key layouts are both read.
"""

EPILOG = """\
examples:
  python -m convert to-jax --hf-dir ./Mistral-7B --out ./ckpt/mistral --dtype bfloat16
  python -m convert to-hf --ckpt ./ckpt/mistral --out ./export/mistral --max-shard-size 2GB
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{to-jax,to-hf}")
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
    for p in (to_jax, to_hf):
        p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported here so that --help answers without loading JAX.
    from unime_jax.conversion.to_hf import export_checkpoint
    from unime_jax.conversion.to_jax import convert_hf_dir

    try:
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
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

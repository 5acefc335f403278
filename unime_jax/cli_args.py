"""Argument-parser pieces shared by the command-line tools that run a UniME model (no jax import)."""

from __future__ import annotations

import argparse
from pathlib import Path

from unime_jax.cli_errors import add_debug_flag


def model_cli_parser(prog: str, description: str, epilog: str, model_example: str) -> argparse.ArgumentParser:
    """An argument parser for a CLI that runs a UniME model, with its required ``--model``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        type=Path,
        help="converted unime-jax checkpoint (unime_model.yaml) or HuggingFace model directory "
        f"(config.json, converted on the fly), with its tokenizer files; {model_example}",
    )
    add_debug_flag(parser)
    return parser

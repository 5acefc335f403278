"""`python -m unime_jax.train --config FILE [--set key=value ...]`: UniME's two training stages.

The command line over :func:`unime_jax.runs.train.train` (what a run does is described there);
with a ``demo:`` section it also prints and writes the demo's results table and plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from unime_jax.cli_errors import add_debug_flag, run
from unime_jax.config import add_config_args, config_from_args, describe
from unime_jax.runs.schema import Config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unime_jax.train",
        description=(
            "Train UniME embeddings: stage 1 (textual discriminative knowledge distillation) and "
            "stage 2 (hard-negative-enhanced instruction tuning), then export."
        ),
        epilog="examples:\n"
        "  python -m unime_jax.train --config configs/demo.yaml\n"
        "  python -m unime_jax.train --config configs/llava16_stage2.yaml --set stage2.batch_size=512\n\n"
        "resuming: rerun the same command; each stage resumes from its newest checkpoint that restores\n"
        "(unusable ones are named and moved to <stage>/checkpoints.skipped/). A rerun that changes what\n"
        "a stage trained with is refused, naming each key (--allow-change KEY forces one).\n\n"
        "exit status: 0 done; 1 a failure while training (NaN/inf streak, too many bad samples, disk);\n"
        "2 a config or data error, found before any model loads, or a checkpoint written for another\n"
        "model or config; 130 interrupted (resumable).\n\n"
        "config sections and fields:\n" + describe(Config),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser)
    parser.add_argument(
        "--allow-change",
        metavar="KEY",
        action="append",
        default=None,
        help="rerunning a workdir with a changed setting that its stages trained with is refused; "
        "this forces the change of KEY (a dotted key or section, repeatable) for the stages still to "
        "train (a finished stage is never retrained)",
    )
    add_debug_flag(parser)
    multi = parser.add_argument_group("multi-host (jax.distributed; SLURM/Open MPI/TPU are auto-detected)")
    multi.add_argument("--coordinator-address", help="host:port of process 0, e.g. 10.0.0.1:1234")
    multi.add_argument("--num-processes", type=int, help="number of processes in the run")
    multi.add_argument("--process-id", type=int, help="this process's index, 0-based")
    return parser


def _with_cli_distributed(cfg: Config, args: argparse.Namespace) -> Config:
    flags = {k: getattr(args, k) for k in ("coordinator_address", "num_processes", "process_id")}
    chosen = {k: v for k, v in flags.items() if v is not None}
    return replace(cfg, distributed=replace(cfg.distributed, **chosen)) if chosen else cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(
        lambda: _train(args),
        debug=args.debug,
        on_interrupt="interrupted; the same command resumes from the last checkpoint",
    )


def _train(args: argparse.Namespace) -> int:
    cfg = _with_cli_distributed(config_from_args(args, Config), args)
    from unime_jax.runs.train import train

    tic = time.perf_counter()
    outcome = train(cfg, tuple(args.allow_change or ()))
    workdir = Path(cfg.workdir)
    if outcome.results:
        from unime_jax.demo.report import plot, results_table, write_results

        print(results_table(outcome.results))
        write_results(workdir, outcome.results)
        metrics = {p.parent.name: p for p in sorted(workdir.glob("*/metrics.jsonl"))}
        print(f"plot: {plot(workdir, metrics, outcome.results)}")
    for path in outcome.exported:
        print(f"exported: {path}")
    print(f"done in {time.perf_counter() - tic:.0f} s; results and logs in {workdir}")
    if outcome.results:
        print(json.dumps(outcome.results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m unime_jax.train --config FILE [--set key=value ...]`: UniME's two training stages.

Stage 1 distils a text-embedding teacher into the LM (LoRA, NLI triplets); its LoRA is merged
and stage 2 tunes a fresh LoRA on MMEB-style pairs with in-batch hard negatives. At the end the
model is exported as a merged HF directory and the last stage's LoRA as a PEFT adapter. With a
`demo:` section the data is generated first, the random backbone is optionally aligned first
(`demo.pretrain`, standing in for the MLLM pretraining UniME starts from), and the model is
evaluated before and after each step, with a k=0 ablation of stage 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from unime_jax.config import Config, ConfigError, add_config_args, config_from_args, describe, dump_yaml


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
        "config sections and fields:\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser)
    multi = parser.add_argument_group("multi-host (jax.distributed; SLURM/Open MPI/TPU are auto-detected)")
    multi.add_argument("--coordinator-address", help="host:port of process 0, e.g. 10.0.0.1:1234")
    multi.add_argument("--num-processes", type=int, help="number of processes in the run")
    multi.add_argument("--process-id", type=int, help="this process's index, 0-based")
    return parser


def _with_cli_distributed(cfg: Config, args: argparse.Namespace) -> Config:
    flags = {k: getattr(args, k) for k in ("coordinator_address", "num_processes", "process_id")}
    chosen = {k: v for k, v in flags.items() if v is not None}
    return replace(cfg, distributed=replace(cfg.distributed, **chosen)) if chosen else cfg


def _summary(cfg: Config, backbone: Any, mesh: Any) -> str:
    import jax
    from flax import nnx

    from unime_jax.training.metrics import count_params

    params = count_params(nnx.state(backbone.model, nnx.Param))
    lines = [
        f"model      {backbone.model_type} ({params / 1e6:.1f}M parameters, {cfg.model.param_dtype} params, "
        f"{cfg.model.dtype} compute)",
        f"devices    {jax.device_count()} x {jax.devices()[0].device_kind} in {jax.process_count()} process(es); "
        f"mesh {dict(mesh.shape)}",
        f"stages     {', '.join(cfg.stages)}",
    ]
    pretrain = {"pretrain": cfg.demo.pretrain} if cfg.demo is not None and cfg.demo.pretrain else {}
    for stage, s in {**pretrain, **{stage: getattr(cfg, stage) for stage in cfg.stages}}.items():
        adapters = f"LoRA r={s.lora.rank or 'preset'}" if s.lora.enabled else "full fine-tuning"
        steps = s.steps if s.steps else f"{s.epochs} epoch(s)"
        lines.append(f"{stage:<10} batch {s.batch_size}, {steps}, lr {s.optimizer.learning_rate}, {adapters}")
    lines.append(f"workdir    {cfg.workdir}")
    return "\n".join(lines)


def _prepare_demo(cfg: Config, workdir: Path) -> tuple[Config, Any]:
    """Generate the demo's data files and point the data section at them."""
    from unime_jax.data.config import MmebSection, NliSection
    from unime_jax.demo.prepare import prepare

    prepared = prepare(workdir / "data", cfg.demo)
    data = replace(
        cfg.data,
        nli=NliSection(
            csv=str(prepared.nli_csv),
            teacher_dir=str(prepared.teacher_dir),
            teacher=prepared.teacher,
            teacher_dim=prepared.teacher_dim,
        ),
        mmeb=MmebSection(
            root=str(prepared.mmeb_root), image_root=str(prepared.image_root), subsets=tuple(prepared.subsets)
        ),
    )
    return replace(cfg, data=data), prepared.heldout


def _evaluator(mesh: Any, held: Any, backbone: Any, workdir: Path):
    """Scores a model on the demo's held-out benchmark through the evaluation harness."""
    import shutil

    from unime_jax.demo.benchmark import evaluate, write_benchmark
    from unime_jax.embedder import UniME

    bench = write_benchmark(workdir / "data" / "eval", held)

    def run(model: Any, label: str) -> dict[str, Any]:
        out = workdir / "eval" / label
        shutil.rmtree(out, ignore_errors=True)  # seconds to recompute, and never stale after a config change
        embedder = UniME(model, backbone.model_type, backbone.config, backbone.tokenizer, mesh=mesh)
        return evaluate(embedder, bench, out, label)

    return run


def _compare_ablation(workdir: Path, results: dict[str, dict[str, Any]]) -> None:
    """k=0 against k=8 on the same held-out rows: the difference and McNemar's exact p-value."""
    from unime_jax.demo.benchmark import METRIC_DATASETS, paired_correct
    from unime_jax.eval.stats import mcnemar_p

    comparison = {}
    for metric in METRIC_DATASETS:
        k0, k8 = (paired_correct(workdir / "eval" / run, metric) for run in ("ablation_k0", "after_stage2"))
        difference = results["ablation_k0"][metric] - results["after_stage2"][metric]
        comparison[metric] = {"difference": difference, "p_value": mcnemar_p(k0, k8)}
    results["ablation_k0"]["vs_after_stage2"] = comparison


def _export(cfg: Config, workdir: Path, backbone: Any, last: Any, mesh: Any) -> list[str]:
    """Merged HF directory, plus the last stage's LoRA as a PEFT adapter over its base weights."""
    from unime_jax.conversion.peft import export_peft
    from unime_jax.conversion.to_hf import export_hf
    from unime_jax.training.run import stage_start

    written = []
    if cfg.export.hf:
        out = workdir / "export" / "hf"
        export_hf(
            last.model,
            backbone.spec,
            backbone.config,
            out,
            stored_hf_config=backbone.hf_config,
            progress=False,
        )
        backbone.tokenizer.save_pretrained(out)
        written.append(str(out))
    if cfg.export.peft and last is not None and last.lora_model is not None:
        base = workdir / "export" / "peft_base_hf"
        start = stage_start(cfg.stages[-1], cfg, mesh, workdir)
        export_hf(
            start, backbone.spec, backbone.config, base, stored_hf_config=backbone.hf_config, progress=False
        )
        backbone.tokenizer.save_pretrained(base)
        out = workdir / "export" / "peft"
        export_peft(last.lora_model, backbone.spec, last.lora_config, out, base_model_name_or_path=str(base))
        written += [str(base), str(out)]
    return written


def train(cfg: Config) -> dict[str, Any]:
    """Run the configured stages; returns the evaluation results (demo) and export paths."""
    import jax

    from unime_jax.sharding import make_mesh
    from unime_jax.training import distributed
    from unime_jax.training.run import PRETRAIN_DIR, load_backbone, run_stage, stage_start

    distributed.initialize(
        cfg.distributed.coordinator_address, cfg.distributed.num_processes, cfg.distributed.process_id
    )
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    held = None
    if cfg.demo is not None:
        cfg, held = _prepare_demo(cfg, workdir)
    if jax.process_index() == 0:
        dump_yaml(cfg, workdir / "config.yaml")
    backbone = load_backbone(cfg, mesh)
    print(_summary(cfg, backbone, mesh), flush=True)
    evaluate = _evaluator(mesh, held, backbone, workdir) if held is not None else None
    results: dict[str, dict[str, Any]] = {}
    if evaluate:
        results["before"] = evaluate(backbone.model, "before")
    pretrain = cfg.demo.pretrain if cfg.demo is not None else None
    if pretrain is not None:
        done = run_stage("stage2", backbone, cfg, mesh, workdir / PRETRAIN_DIR, pretrain, label="pretrain")
        backbone.model = done.model
        if evaluate:
            results["pretrained"] = evaluate(done.model, "pretrained")
    last = None
    for stage in cfg.stages:
        last = run_stage(stage, backbone, cfg, mesh, workdir / stage)
        backbone.model = last.model
        if evaluate:
            results[f"after_{stage}"] = evaluate(last.model, f"after_{stage}")
    if evaluate and cfg.demo.ablation and "stage2" in cfg.stages:
        # The same stage 2 from the same start, without hard negatives (plain in-batch InfoNCE).
        section = replace(cfg.stage2, loss=replace(cfg.stage2.loss, k=0, all_negatives=True))
        ablation_backbone = replace(backbone, model=stage_start("stage2", cfg, mesh, workdir))
        done = run_stage("stage2", ablation_backbone, cfg, mesh, workdir / "stage2_ablation_k0", section)
        results["ablation_k0"] = evaluate(done.model, "ablation_k0")
        _compare_ablation(workdir, results)
    exported = (
        _export(cfg, workdir, backbone, last, mesh) if last is not None and jax.process_index() == 0 else []
    )
    return {"results": results, "exported": exported}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _with_cli_distributed(config_from_args(args), args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    tic = time.perf_counter()
    outcome = train(cfg)
    workdir = Path(cfg.workdir)
    if outcome["results"]:
        from unime_jax.demo.report import plot, results_table, write_results

        print(results_table(outcome["results"]))
        write_results(workdir, outcome["results"])
        metrics = {p.parent.name: p for p in sorted(workdir.glob("*/metrics.jsonl"))}
        print(f"plot: {plot(workdir, metrics, outcome['results'])}")
    for path in outcome["exported"]:
        print(f"exported: {path}")
    print(f"done in {time.perf_counter() - tic:.0f} s; results and logs in {workdir}")
    if outcome["results"]:
        print(json.dumps(outcome["results"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A whole training run, as ``python -m unime_jax.train`` runs it: backbone -> stages -> export.

Stage 1 distils a text-embedding teacher into the LM (LoRA, NLI triplets); its LoRA is merged
and stage 2 tunes a fresh LoRA on MMEB-style pairs with in-batch hard negatives, from the merged
stage-1 model. At the end the model is exported as a merged HF directory and the last stage's
LoRA as a PEFT adapter over the weights it started from. A ``demo:`` section adds the demo's data,
warm-up, evaluations and ablation (``runs.demo``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from unime_jax.config import dump_yaml
from unime_jax.models import lora
from unime_jax.runs.demo import Demo
from unime_jax.runs.schema import Config
from unime_jax.runs.stages import MERGED_DIR, Backbone, StageResult, load_backbone, run_stage, stage_start

__all__ = ["Outcome", "summary", "train"]


@dataclass
class Outcome:
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # the demo's evaluations
    exported: list[str] = field(default_factory=list)  # directories written at the end


def summary(cfg: Config, backbone: Backbone, mesh: Mesh) -> str:
    """What is about to run: model, devices, each stage's batch, length, learning rate and adapters."""
    params = lora.param_counts(backbone.model)[1]
    lines = [
        f"model      {backbone.model_type} ({params / 1e6:.1f}M parameters, {cfg.model.param_dtype} params, "
        f"{cfg.model.dtype} compute)",
        f"devices    {jax.device_count()} x {jax.devices()[0].device_kind} in {jax.process_count()} process(es); "
        f"mesh {dict(mesh.shape)}",
        f"stages     {', '.join(cfg.stages)}",
    ]
    pretrain = {"pretrain": cfg.demo.pretrain} if cfg.demo is not None and cfg.demo.pretrain else {}
    for stage, s in {**pretrain, **{stage: getattr(cfg, stage) for stage in cfg.stages}}.items():
        adapters = f"LoRA r={s.lora.rank}" if s.lora.enabled else "full fine-tuning"
        steps = s.steps if s.steps else f"{s.epochs} epoch(s)"
        lines.append(f"{stage:<10} batch {s.batch_size}, {steps}, lr {s.optimizer.learning_rate}, {adapters}")
    lines.append(f"workdir    {cfg.workdir}")
    return "\n".join(lines)


def _export(
    cfg: Config, workdir: Path, backbone: Backbone, last: StageResult, start: Path | None, mesh: Mesh
) -> list[str]:
    """Merged HF directory, plus the last stage's LoRA as a PEFT adapter over its base weights."""
    from unime_jax.conversion.peft import export_peft
    from unime_jax.conversion.to_hf import export_hf

    written = []
    if cfg.export.hf:
        out = workdir / "export" / "hf"
        export_hf(last.model, backbone.spec, backbone.config, out, stored_hf_config=backbone.hf_config, progress=False)
        backbone.tokenizer.save_pretrained(out)
        written.append(str(out))
    if cfg.export.peft and last.lora_model is not None:
        base = workdir / "export" / "peft_base_hf"
        start_model = stage_start(cfg, mesh, start)
        export_hf(
            start_model, backbone.spec, backbone.config, base, stored_hf_config=backbone.hf_config, progress=False
        )
        backbone.tokenizer.save_pretrained(base)
        out = workdir / "export" / "peft"
        export_peft(last.lora_model, backbone.spec, last.lora_config, out, base_model_name_or_path=str(base))
        written += [str(base), str(out)]
    return written


def train(cfg: Config) -> Outcome:
    """Run the configured stages (resuming what an earlier run left) and export the result."""
    from unime_jax.sharding import make_mesh
    from unime_jax.training import distributed

    distributed.initialize(
        cfg.distributed.coordinator_address, cfg.distributed.num_processes, cfg.distributed.process_id
    )
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    demo = Demo(cfg, workdir) if cfg.demo is not None else None
    if demo is not None:
        cfg = demo.cfg
    if jax.process_index() == 0:
        dump_yaml(cfg, workdir / "config.yaml")
    backbone = load_backbone(cfg, mesh)
    print(summary(cfg, backbone, mesh), flush=True)
    previous: Path | None = None  # the merged model the next stage starts from
    if demo is not None:
        demo.evaluate(backbone, mesh, "before")
        previous = demo.warm_up(backbone, mesh)
    last, start = None, None
    for stage in cfg.stages:
        start = previous
        last = run_stage(stage, backbone, cfg, mesh, workdir / stage)
        backbone.model = last.model
        previous = workdir / stage / MERGED_DIR
        if demo is not None:
            demo.evaluate(backbone, mesh, f"after_{stage}")
    if demo is not None:
        demo.ablation(backbone, mesh, start)
    outcome = Outcome(results=demo.results if demo is not None else {})
    if last is not None and jax.process_index() == 0:
        outcome.exported = _export(cfg, workdir, backbone, last, start, mesh)
    return outcome

"""A whole training run, as ``python -m unime_jax.train`` runs it: backbone -> stages -> export.

Stage 1 distils a text-embedding teacher into the LM (LoRA, NLI triplets); its LoRA is merged
and stage 2 tunes a fresh LoRA on MMEB-style pairs with in-batch hard negatives, from the merged
stage-1 model. At the end the model is exported as a merged HF directory and the last stage's
LoRA as a PEFT adapter over the weights it started from. A ``demo:`` section adds the demo's data,
warm-up, evaluations and ablation (``runs.demo``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from unime_jax.atomic import atomic_directory, write_text
from unime_jax.cli_errors import usage_errors
from unime_jax.config import dump_yaml, to_dict
from unime_jax.data.errors import DataError
from unime_jax.models import lora
from unime_jax.runs.demo import Demo
from unime_jax.runs.model_card import model_card, write_card
from unime_jax.runs.preflight import check_inputs
from unime_jax.runs.records import StageRecord, check_unchanged, log_forced
from unime_jax.runs.schema import Config
from unime_jax.runs.stages import MERGED_DIR, Backbone, StageResult, load_backbone, run_stage, stage_start
from unime_jax.training.sections import StageSection

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
    cfg: Config,
    workdir: Path,
    backbone: Backbone,
    last: StageResult,
    start: Path | None,
    mesh: Mesh,
    evaluation: str | None = None,
) -> list[str]:
    """Merged HF directory, plus the last stage's LoRA as a PEFT adapter over its base weights,
    each with its model card (``runs.model_card``; ``evaluation``: the run's evaluation summary).

    Each directory is written under a temporary name and renamed into place (replacing an
    earlier export), so a run killed while exporting leaves none half-written and its rerun
    exports again.

    Every process of a multi-host run calls it: weights sharded over several hosts are gathered
    for process 0, which writes every file.
    """
    from unime_jax.conversion.to_hf import export_hf

    primary = jax.process_index() == 0
    written = []
    hf = workdir / "export" / "hf"
    if cfg.export.hf:
        with atomic_directory(hf, replace=True, collective=True) as partial:
            export_hf(
                last.model, backbone.spec, backbone.config, partial, stored_hf_config=backbone.hf_config, progress=False
            )
            if primary:
                backbone.tokenizer.save_pretrained(partial)
                card = model_card(
                    cfg, backbone, library="transformers", path=str(hf), architecture=_architecture(partial),
                    evaluation=evaluation,
                )  # fmt: skip
                write_card(partial, card)
        written.append(str(hf))
    if cfg.export.peft and last.adapter is not None:
        base = workdir / "export" / "peft_base_hf"
        start_model = stage_start(cfg, mesh, start)
        with atomic_directory(base, replace=True, collective=True) as partial:
            export_hf(
                start_model, backbone.spec, backbone.config, partial, stored_hf_config=backbone.hf_config, progress=False
            )
            if primary:
                backbone.tokenizer.save_pretrained(partial)
        out = workdir / "export" / "peft"
        if primary:
            with atomic_directory(out, replace=True) as partial:
                _copy_adapter(last.adapter, partial, base)
                card = model_card(
                    cfg, backbone, library="peft", path=str(out), architecture=_architecture(base),
                    evaluation=evaluation, merged=str(hf) if cfg.export.hf else None, adapter_base=str(base),
                )  # fmt: skip
                write_card(partial, card)
        written += [str(base), str(out)]
    return written


def _architecture(hf_dir: Path) -> str:
    """The first ``architectures`` entry of an exported config.json (the class transformers loads)."""
    return json.loads((hf_dir / "config.json").read_text())["architectures"][0]


def _copy_adapter(adapter: Path, out: Path, base: Path) -> None:
    """The stage's PEFT adapter, pointed at the base weights it was exported over."""
    from unime_jax.conversion.peft import ADAPTER_CONFIG

    for file in adapter.iterdir():
        shutil.copy2(file, out / file.name)
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    write_text(out / ADAPTER_CONFIG, json.dumps({**config, "base_model_name_or_path": str(base)}, indent=2))


def _stages(cfg: Config, workdir: Path, demo: Demo | None) -> list[tuple[StageRecord, StageSection]]:
    """Every stage the run trains, in order, with its section."""
    own = [(StageRecord(workdir / stage, stage, stage), getattr(cfg, stage)) for stage in cfg.stages]
    return (demo.stages() if demo is not None else []) + own


def train(cfg: Config, allow_changes: tuple[str, ...] = ()) -> Outcome:
    """Run the configured stages (resuming what an earlier run left) and export the result.

    Before any model loads, the config is compared with what the workdir's stages were trained
    with (``runs.records``: a change to a trained setting is refused, a ConfigChangedError, unless
    its key is in ``allow_changes``), and the data of every unfinished stage is opened and sized
    (``runs.preflight``: a ConfigError, or a DataError raised as a UsageError). Both exit 2 from
    the command line. Forced changes are logged once both checks pass.
    """
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
    stages = _stages(cfg, workdir, demo)
    with usage_errors(DataError):
        forced = check_unchanged(to_dict(cfg), [record for record, _ in stages], allow_changes)
        check_inputs(cfg, stages)
    log_forced(forced)
    if jax.process_index() == 0:
        dump_yaml(cfg, workdir / "config.yaml")  # this run's settings; each stage keeps its own record
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
    if last is not None:  # every process: the export gathers sharded weights
        evaluation = demo.summary() if demo is not None else None
        outcome.exported = _export(cfg, workdir, backbone, last, start, mesh, evaluation)
    return outcome

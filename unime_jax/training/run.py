"""Running UniME's stages end to end: backbone -> stage 1 -> merge -> stage 2 -> export.

Each stage lives in `<workdir>/<stage>/`: orbax checkpoints, metrics.jsonl, TensorBoard events,
and, once finished, `merged/` (the stage's LoRA folded into the backbone, as the paper starts
stage 2 from). A restarted run resumes the unfinished stage from its latest checkpoint and skips
finished ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from unime_jax.config import Config, to_dict
from unime_jax.model_io import init_model, load_model, save_model
from unime_jax.models import lora
from unime_jax.models.registry import ModelSpec, spec_for, with_runtime
from unime_jax.tokenizer import load_tokenizer
from unime_jax.training import loop
from unime_jax.training.checkpoints import Checkpoints
from unime_jax.training.metrics import MetricsWriter, count_params, lm_flops_per_token, peak_flops
from unime_jax.training.sections import Stage2Section, StageSection
from unime_jax.training.tasks import Stage1Task, Stage2Task
from unime_jax.training.trainer import Trainer, TrainerConfig

MERGED_DIR = "merged"
PRETRAIN_DIR = "pretrain"  # the demo's alignment warm-up (demo.pretrain), which stage 1 then starts from
STAGE_NUMBERS = {"stage1": 1, "stage2": 2}


@dataclass
class Backbone:
    """A model with what is needed to feed, checkpoint and export it."""

    model: nnx.Module
    spec: ModelSpec
    config: Any  # architecture dataclass
    tokenizer: Any
    hf_config: dict | None  # the source config.json, when the model came from HF weights

    @property
    def model_type(self) -> str:
        return self.spec.model_type


def runtime_fields(cfg: Config) -> dict[str, str]:
    m = cfg.model
    return {"dtype": m.dtype, "param_dtype": m.param_dtype, "attention": m.attention, "remat": m.remat}


def load_backbone(cfg: Config, mesh: Mesh) -> Backbone:
    """From `model.checkpoint` (ours or an HF directory), or randomly initialised from `model.init`."""
    m = cfg.model
    if m.checkpoint:
        path = Path(m.checkpoint)
        if (path / "unime_model.yaml").is_file():
            loaded, hf_config = load_model(path, mesh, **runtime_fields(cfg)), None
        else:
            from unime_jax.conversion.to_jax import load_hf_model, read_hf_config

            loaded, hf_config = load_hf_model(path, mesh, **runtime_fields(cfg)), read_hf_config(path)
        model, spec, arch = loaded.model, loaded.spec, loaded.config
    elif m.init:
        if "model_type" not in m.init:
            raise ValueError("model.init must be an HF config.json dict with a 'model_type'")
        spec = spec_for(m.init["model_type"])
        arch = with_runtime(spec.from_hf(m.init), **runtime_fields(cfg))
        model, hf_config = init_model(spec, arch, mesh, seed=cfg.seed), None
    else:
        raise ValueError(
            "set model.checkpoint (a converted or HF directory) or model.init (an HF config dict)"
        )
    tokenizer_source = m.tokenizer or m.checkpoint
    if tokenizer_source is None:
        raise ValueError("model.tokenizer is needed when the model is built from model.init")
    return Backbone(model, spec, arch, load_tokenizer(tokenizer_source, spec.model_type), hf_config)


def stage_start(stage: str, cfg: Config, mesh: Mesh, workdir: Path) -> nnx.Module:
    """A fresh copy of the weights a stage starts from (the base a PEFT adapter applies to)."""
    if stage == "stage2" and "stage1" in cfg.stages:
        previous: Path | None = workdir / "stage1" / MERGED_DIR
    elif cfg.demo is not None and cfg.demo.pretrain is not None:
        previous = workdir / PRETRAIN_DIR / MERGED_DIR  # the demo's first stage follows its warm-up
    else:
        previous = None
    if previous is not None and previous.is_dir():
        return load_model(previous, mesh, **runtime_fields(cfg)).model
    return load_backbone(cfg, mesh).model  # reloaded, or re-initialised from the same seed


def _family_and_prefix(backbone: Backbone) -> tuple[str, str]:
    """The decoder family and where the decoder sits in the module tree (LoRA targets)."""
    arch = backbone.config
    if backbone.model_type == "llava_next":
        return arch.text.family, "language_model."
    if backbone.model_type == "phi3_v":
        return arch.text.family, ""
    return arch.family, ""


def lora_config(section: StageSection, stage: int, backbone: Backbone) -> lora.LoRAConfig | None:
    """The stage's adapters: the paper's presets with any configured overrides."""
    if not section.lora.enabled:
        return None
    family, prefix = _family_and_prefix(backbone)
    preset = lora.unime_lora(family, stage, prefix=prefix, vision=section.lora.vision)
    chosen = {
        k: v
        for k, v in asdict(section.lora).items()
        if k in ("rank", "alpha", "dropout", "targets") and v is not None
    }
    return replace(preset, **chosen)


def _pipeline(stage: str, cfg: Config, backbone: Backbone, section: StageSection):
    """The stage's grain pipeline; each process reads batch_size / process_count rows per step."""
    from unime_jax.data.negatives import open_mined
    from unime_jax.data.pipeline import mmeb_source, stage1_pipeline, stage2_pipeline

    batch_size = section.batch_size
    nproc = jax.process_count()
    if batch_size % nproc:
        raise ValueError(f"{stage}.batch_size={batch_size} does not split over {nproc} processes")
    data = replace(cfg.data, loader=replace(cfg.data.loader, batch_size=batch_size // nproc))
    if stage == "stage1":
        return stage1_pipeline(data, backbone.tokenizer, seed=cfg.seed)
    from unime_jax.processing.featurizer import BackboneFeaturizer
    from unime_jax.processing.prompts import PromptFormat, style_for

    # MMEB instructions are fed raw (no chat template), as VLM2Vec and UniME's stage 2 do.
    style = style_for(
        backbone.model_type if backbone.model_type in ("llava_next", "phi3_v") else backbone.config.family
    )
    featurizer = BackboneFeaturizer.for_model(
        backbone.model_type,
        backbone.config,
        backbone.tokenizer,
        max_len=cfg.data.text.max_len,
        prompt=PromptFormat(style, raw=True),
    )
    source = mmeb_source(data)
    negatives = section.negatives
    table = None if negatives.mode == "in_batch" else open_mined(negatives.dir, source, negatives.k)
    return stage2_pipeline(
        data, featurizer, seed=cfg.seed, source=source, negatives=table, num_negatives=negatives.k
    )


def _identity(stage: str, backbone: Backbone, lcfg: lora.LoRAConfig | None, section: StageSection) -> dict:
    """What a checkpoint must match to be resumed: architecture, stage, adapters, batch, mined table."""
    identity = {
        "model_type": backbone.model_type,
        "architecture": to_dict(backbone.config),
        "stage": stage,
        "lora": None if lcfg is None else asdict(lcfg),
        "batch_size": section.batch_size,
        "grad_chunks": section.grad_chunks,
    }
    # Only with a mined table, so that in-batch checkpoints written before the option still resume.
    if isinstance(section, Stage2Section) and section.negatives.mode != "in_batch":
        from unime_jax.data.negatives import read_mined_manifest

        negatives = section.negatives
        table = read_mined_manifest(negatives.dir).table_sha256
        identity["negatives"] = {"mode": negatives.mode, "k": negatives.k, "table_sha256": table}
    return identity


def _flops_per_token(model: nnx.Module, gradcache: bool) -> float:
    trainable = count_params(nnx.state(model, lora.trainable_filter(model)))
    total = count_params(nnx.state(model, nnx.Param))
    frozen = total - trainable if lora.has_lora(model) else 0
    return lm_flops_per_token(frozen, trainable if lora.has_lora(model) else total, gradcache)


@dataclass
class StageResult:
    model: nnx.Module  # the backbone with this stage's training merged in
    lora_model: nnx.Module | None  # before merging (for a PEFT export), None when resumed as finished
    lora_config: lora.LoRAConfig | None
    history: list[dict[str, float]]
    directory: Path


def run_stage(
    stage: str,
    backbone: Backbone,
    cfg: Config,
    mesh: Mesh,
    directory: Path,
    section: StageSection | None = None,
    label: str | None = None,
) -> StageResult:
    """Train one stage from `backbone.model` (which it takes over) and return the merged result.

    `stage` picks the task ("stage1" distillation, "stage2" contrastive); `section` overrides its
    config section and `label` its name in the progress bar and metrics.
    """
    section = section or getattr(cfg, stage)
    label = label or stage
    merged = directory / MERGED_DIR
    if (merged / "unime_model.yaml").is_file():
        print(f"{label}: finished earlier, loading {merged}")
        return StageResult(load_model(merged, mesh, **runtime_fields(cfg)).model, None, None, [], directory)
    lcfg = lora_config(section, STAGE_NUMBERS[stage], backbone)
    model = backbone.model
    if lcfg is not None:
        lora.apply_lora(model, lcfg, nnx.Rngs(cfg.seed + STAGE_NUMBERS[stage]))
    pipeline = _pipeline(stage, cfg, backbone, section)
    total = section.steps or max(1, math.ceil(section.epochs * pipeline.batches_per_epoch))
    if stage == "stage1":
        task = Stage1Task(section.loss)
    else:
        task = Stage2Task(section.loss, in_batch=section.negatives.mode != "mined")
    trainer = Trainer(
        model,
        task,
        section.optimizer,
        total,
        mesh,
        TrainerConfig(grad_chunks=section.grad_chunks, max_nonfinite=section.max_nonfinite),
    )
    state = trainer.init_state(cfg.seed)
    iterator = iter(pipeline)
    identity = _identity(stage, backbone, lcfg, section)
    checkpoints = Checkpoints(directory / "checkpoints", keep=section.keep_checkpoints)
    latest = checkpoints.latest_step()
    if latest is not None:
        print(f"{label}: resuming from step {latest} in {checkpoints.directory}")
        state = checkpoints.restore(latest, state, identity, iterator)
    writer = MetricsWriter(directory)
    try:
        state, history = loop.run(
            trainer,
            state,
            iterator,
            loop.LoopConfig(
                total_steps=total, save_every=section.save_every, log_every=section.log_every, desc=label
            ),
            mesh,
            writer,
            checkpoints=checkpoints,
            identity=identity,
            config=to_dict(cfg),
            data_iterator=iterator,
            flops_per_token=_flops_per_token(model, section.grad_chunks > 1),
            peak=peak_flops(section.peak_tflops),
            data_stats=lambda: iterator.total_counts().metrics(),
        )
    finally:
        writer.close()
        checkpoints.close()
    # Two views of the trained state: one keeps the adapters (PEFT export), one gets them merged.
    adapted = trainer.model(state) if lcfg is not None else None
    trained = trainer.model(state)
    if lcfg is not None:
        lora.merge_lora(trained)
    save_model(merged, trained, backbone.model_type, backbone.config, hf_config=backbone.hf_config)
    backbone.tokenizer.save_pretrained(merged)  # the next stage (or a user) loads the model from here
    return StageResult(trained, adapted, lcfg, history, directory)

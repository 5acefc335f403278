"""One UniME stage from a backbone: adapters, pipeline, trainer, checkpoints, then the merged model.

Each stage lives in `<workdir>/<stage>/`: orbax checkpoints, metrics.jsonl, TensorBoard events,
and, once finished, `adapter/` (its LoRA as a PEFT adapter), `config.yaml` (the run config it
trained with, never rewritten) and, last, `merged/` (the stage's LoRA folded into the backbone, as
the paper starts stage 2 from), which appears whole or not at all and marks the stage finished. A
restarted run resumes the unfinished stage from its newest checkpoint that restores and skips
finished ones. What is specific to the backbone (LoRA targets, input processing) comes from its
spec; what the run does around the stages is ``runs.train``'s.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from unime_jax.atomic import atomic_directory
from unime_jax.backbones import BackboneSpec, spec_for, with_runtime
from unime_jax.config import to_dict
from unime_jax.data.errors import DataError
from unime_jax.data.packing import PackSpec, pack_classes, packed_lengths
from unime_jax.model_io import MODEL_FILE, init_model, load_model, save_model
from unime_jax.models import lora
from unime_jax.processing.featurizer import BackboneFeaturizer
from unime_jax.runs.records import MERGED_DIR, write_record
from unime_jax.runs.schema import Config
from unime_jax.sharding import LOGICAL_RULES
from unime_jax.tokenizer import load_tokenizer
from unime_jax.training import loop
from unime_jax.training.checkpoints import Checkpoints
from unime_jax.training.distributed import checked_on_every_process, host_arrays
from unime_jax.training.metrics import MetricsWriter
from unime_jax.training.sections import Stage2Section, StageSection
from unime_jax.training.tasks import Stage1Task, Stage2Task
from unime_jax.training.trainer import Trainer

ADAPTER_DIR = "adapter"  # the stage's LoRA as a PEFT adapter, written beside merged/
STAGE_NUMBERS = {"stage1": 1, "stage2": 2}


@dataclass
class Backbone:
    """A model with what is needed to feed, checkpoint and export it."""

    model: nnx.Module
    spec: BackboneSpec
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
        if (path / MODEL_FILE).is_file():
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


def stage_start(cfg: Config, mesh: Mesh, previous: Path | None) -> nnx.Module:
    """A fresh copy of the weights a stage starts from (the base a PEFT adapter applies to): the
    merged model of the step before it (``previous``) when there is one, else the backbone."""
    if previous is not None and (previous / MODEL_FILE).is_file():
        return load_model(previous, mesh, **runtime_fields(cfg)).model
    return load_backbone(cfg, mesh).model  # reloaded, or re-initialised from the same seed


def lora_config(stage: str, section: StageSection, spec: BackboneSpec, arch: Any) -> lora.LoRAConfig | None:
    """The stage's adapters on a backbone (``spec``, architecture ``arch``): the configured rank,
    alpha, dropout, variant and init on the modules its `targets` regex names, or else its
    preset's (the backbone's projections by default)."""
    if not section.lora.enabled:
        return None
    settings = section.lora
    missing = [k for k in ("rank", "alpha", "dropout") if getattr(settings, k) is None]
    if missing:
        raise ValueError(
            f"{stage}.lora.{missing[0]} is not set (the paper's recipes set rank, alpha and dropout: "
            f"configs/{stage}_common.yaml); set it, or lora.enabled: false for full fine-tuning"
        )
    if settings.targets and (settings.preset != "unime" or settings.vision):
        raise ValueError(
            f"{stage}.lora.targets is set, and so are lora.preset or lora.vision, which choose modules "
            "too; keep one of them"
        )
    targets = settings.targets or spec.lora_targets(arch, vision=settings.vision, preset=settings.preset)
    return lora.LoRAConfig(
        rank=settings.rank,
        alpha=settings.alpha,
        dropout=settings.dropout,
        targets=targets,
        variant=settings.variant,
        init=settings.init,
        quantize_base=settings.quantize_base,
    )


def pack_spec(
    section: StageSection,
    mesh: Mesh,
    text_len: int,
    featurizer: BackboneFeaturizer | None,
    roles: tuple[str, ...],
) -> PackSpec | None:
    """The packed layout for this stage (None: padded): classes up to the featurizer's lengths."""
    layout = section.layout
    if layout.mode != "packed":
        return None
    shards = math.prod(mesh.shape[axis] for axis in LOGICAL_RULES["batch"]) // jax.process_count()
    image_lengths: tuple[int, ...] = ()
    extras: tuple[str, ...] = ()
    if featurizer is not None and featurizer.inputs.max_image_tokens:
        least = featurizer.inputs.min_image_tokens
        image_lengths = tuple(n for n in packed_lengths(featurizer.seq_len, layout.length_step) if n >= least)
        extras = tuple(key for key in featurizer.inputs.empty() if key != "pixel_values")
    classes = pack_classes(
        packed_lengths(text_len, layout.length_step), image_lengths, layout.chunk_tokens, layout.max_chunk_rows
    )
    return PackSpec(
        classes, shards, extras, layout.tile_chunk, roles, first_shard=jax.process_index() * shards
    )


def _pipeline(stage: str, cfg: Config, backbone: Backbone, section: StageSection, mesh: Mesh):
    """The stage's grain pipeline; each process reads batch_size / process_count rows per step."""
    from unime_jax.data.negatives import open_mined
    from unime_jax.data.pipeline import mmeb_source, stage1_pipeline, stage2_pipeline

    batch_size = section.batch_size
    nproc = jax.process_count()
    if batch_size % nproc:
        raise ValueError(f"{stage}.batch_size={batch_size} does not split over {nproc} processes")
    data = replace(cfg.data, loader=replace(cfg.data.loader, batch_size=batch_size // nproc))
    if stage == "stage1":
        roles = ("anchor",) if section.loss.candidates == "self" else ()
        pack = pack_spec(section, mesh, cfg.data.text.max_len, None, roles)
        return stage1_pipeline(data, backbone.tokenizer, seed=cfg.seed, pack=pack)
    # MMEB instructions are fed raw (no chat template), as VLM2Vec and UniME's stage 2 do.
    featurizer = backbone.spec.featurizer(
        backbone.config, backbone.tokenizer, max_len=cfg.data.text.max_len, raw=True
    )
    source = mmeb_source(data)
    negatives = section.negatives
    table = open_mined(negatives.dir, source, negatives.k, data.mmeb.image_size) if negatives.source == "mined" else None
    # Text-only data: no image classes, so the packed step carries no tiles and runs no tower.
    pack = pack_spec(section, mesh, cfg.data.text.max_len, featurizer if source.has_images else None, ())
    return stage2_pipeline(
        data,
        featurizer,
        seed=cfg.seed,
        source=source,
        negatives=table,
        num_negatives=negatives.k,
        data_negatives=negatives.source == "data",
        pack=pack,
    )


def _check_packable(
    stage: str, section: StageSection, model: nnx.Module, spec: BackboneSpec, adapted: list[str] | None
) -> None:
    """The packed layout runs the vision tower once per tile without gradients: it must be frozen,
    every module under the spec's ``vision_tower`` path (attention, MLP, embeddings).

    `adapted`: the module paths that got adapters (None: full fine-tuning).
    """
    if section.layout.mode != "packed" or not hasattr(model, "tile_features"):
        return
    if spec.vision_tower is None:
        raise ValueError(f"{spec.model_type}'s spec names no vision_tower: its packed layout cannot be checked")
    tower = f"{spec.vision_tower}."
    if adapted is None or any(path.startswith(tower) for path in adapted):
        why = "full fine-tuning trains" if adapted is None else "its LoRA targets adapt"
        raise ValueError(
            f"{stage}.layout.mode packed needs a frozen vision tower, but {why} it; "
            f"set {stage}.layout.mode: padded for this run"
        )


def _identity(stage: str, backbone: Backbone, lcfg: lora.LoRAConfig | None, section: StageSection) -> dict:
    """What a checkpoint must match to be resumed: architecture, stage, adapters, batch, mined table."""
    identity = {
        "model_type": backbone.model_type,
        "architecture": to_dict(backbone.config),
        "stage": stage,
        "lora": None if lcfg is None else _lora_identity(lcfg),
        "batch_size": section.batch_size,
        "grad_chunks": section.grad_chunks,
    }
    # Only beyond the batch, so that in-batch checkpoints written before the option still resume.
    if isinstance(section, Stage2Section) and section.negatives.mode != "in_batch":
        from unime_jax.data.negatives import read_mined_manifest

        negatives = section.negatives
        identity["negatives"] = {"mode": negatives.mode, "k": negatives.k}
        if negatives.source == "mined":
            identity["negatives"]["table_sha256"] = read_mined_manifest(negatives.dir).table_sha256
    return identity


def _lora_identity(lcfg: lora.LoRAConfig) -> dict:
    """The adapters' settings; variant, init and quantize_base only when not plain LoRA's defaults,
    so that checkpoints written before those options existed still resume."""
    identity = asdict(lcfg)
    defaults = lora.LoRAConfig(rank=1, alpha=1.0, dropout=0.0, targets="")
    for name in ("variant", "init", "quantize_base"):
        if identity[name] == getattr(defaults, name):
            del identity[name]
    return identity


@dataclass
class StageResult:
    model: nnx.Module  # the backbone with this stage's training merged in
    adapter: Path | None  # the stage's LoRA as a PEFT adapter (None without LoRA)
    history: list[dict[str, float]]
    directory: Path


def _save_adapter(
    directory: Path, adapted: nnx.Module | None, spec: BackboneSpec, lcfg: lora.LoRAConfig | None
) -> Path | None:
    """The trained adapters as a PEFT directory, kept with the stage so that an export after a
    restart has them (its base model path is filled in on export). Every process calls it: the
    adapters are gathered whole (with fsdp or tensor meshes process 0 holds only some shards),
    then process 0 writes them."""
    if adapted is None or lcfg is None:
        return None
    from unime_jax.conversion.peft import export_peft

    nnx.update(adapted, host_arrays(nnx.state(adapted, nnx.LoRAParam)))
    out = directory / ADAPTER_DIR
    if jax.process_index() == 0:
        with atomic_directory(out, replace=True) as partial:
            export_peft(adapted, spec, lcfg, partial, base_model_name_or_path="")
    return out


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
    if (merged / MODEL_FILE).is_file():
        print(f"{label}: finished earlier, loading {merged}")
        adapter = directory / ADAPTER_DIR
        model = load_model(merged, mesh, **runtime_fields(cfg)).model
        return StageResult(model, adapter if adapter.is_dir() else None, [], directory)
    if merged.exists():  # written in place by an older version and killed half way: write it again
        print(f"{label}: {merged} is incomplete; it is written again from the last checkpoint")
        if jax.process_index() == 0:
            shutil.rmtree(merged)
    lcfg = lora_config(stage, section, backbone.spec, backbone.config)
    model = backbone.model
    adapted = None
    if lcfg is not None:
        adapted = lora.apply_lora(model, lcfg, nnx.Rngs(cfg.seed + STAGE_NUMBERS[stage]))
    _check_packable(stage, section, model, backbone.spec, adapted)
    pipeline = _pipeline(stage, cfg, backbone, section, mesh)
    # Free memory and the data read differ between hosts: the verdicts are agreed on, so that no
    # process stops alone while the others wait in a collective step.
    print(f"{label}: {checked_on_every_process(pipeline.check_host_memory, DataError)}", flush=True)
    total = section.steps or max(1, math.ceil(section.epochs * pipeline.batches_per_epoch))
    if stage == "stage1":
        task = Stage1Task(section.loss)
    else:
        task = Stage2Task(section.loss, in_batch=section.negatives.in_batch)
    trainer = Trainer(model, task, section, total, mesh)
    state = trainer.init_state(cfg.seed)
    iterator = iter(pipeline)
    checkpoints = Checkpoints(
        directory / "checkpoints",
        _identity(stage, backbone, lcfg, section),
        to_dict(cfg),
        keep=section.keep_checkpoints,
    )
    # The newest checkpoint that restores; unusable ones are named, set aside, never deleted.
    state, latest = checkpoints.restore_latest(state, iterator, report=lambda line: print(f"{label}: {line}"))
    if latest is not None:
        print(f"{label}: resuming from step {latest} in {checkpoints.directory}")
    writer = MetricsWriter(  # rows past the checkpoint are redone
        directory, start_step=latest or 0, wandb=cfg.metrics.wandb, label=label, run_config=to_dict(cfg)
    )
    failed = True
    try:
        state, history = loop.run(trainer, state, iterator, writer, checkpoints=checkpoints, label=label)
        failed = False
    finally:
        writer.close(failed=failed)
        checkpoints.close()
    print(f"{label}: {iterator.summary()}", flush=True)
    # The bad-sample limit, judged on everything this process saw, however little.
    checked_on_every_process(iterator.check_final, DataError)
    # Two views of the trained state: one keeps the adapters (PEFT export), one gets them merged.
    adapted = trainer.model(state) if lcfg is not None else None
    trained = trainer.model(state)
    if lcfg is not None:
        lora.merge_lora(trained)
    adapter = _save_adapter(directory, adapted, backbone.spec, lcfg)
    if jax.process_index() == 0:
        write_record(directory, to_dict(cfg))  # what this stage trained with, never rewritten
    # Last, and whole or not at all: merged/ is what marks the stage finished.
    save_model(
        merged, trained, backbone.model_type, backbone.config, hf_config=backbone.hf_config, tokenizer=backbone.tokenizer
    )
    return StageResult(trained, adapter, history, directory)

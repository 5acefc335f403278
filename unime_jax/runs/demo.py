"""What the CPU demo adds around the stages (a run config with a ``demo:`` section).

- its data is generated first and the data section pointed at it;
- its random backbone is aligned by a warm-up (``demo.pretrain``, a stage-2 section, in
  ``<workdir>/pretrain/``), standing in for the MLLM pretraining UniME starts from;
- every model along the way is scored on the held-out benchmark through the evaluation harness;
- stage 2 is rerun with k=0 from the same start, and compared row by row with k=8.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from unime_jax.runs.records import StageRecord
from unime_jax.runs.schema import Config
from unime_jax.runs.stages import MERGED_DIR, Backbone, StageResult, run_stage, stage_start
from unime_jax.training.sections import StageSection

__all__ = ["ABLATION_DIR", "PRETRAIN_DIR", "Demo"]

PRETRAIN_DIR = "pretrain"
ABLATION_DIR = "stage2_ablation_k0"


class Demo:
    """The demo's data, warm-up, evaluations and ablation for one run."""

    def __init__(self, cfg: Config, workdir: Path) -> None:
        from unime_jax.data.config import MmebSection, NliSection
        from unime_jax.demo.benchmark import write_benchmark
        from unime_jax.demo.prepare import prepare

        assert cfg.demo is not None
        self.workdir = workdir
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
                root=str(prepared.mmeb_root),
                image_root=str(prepared.image_root),
                subsets=tuple(prepared.subsets),
            ),
        )
        self.cfg = replace(cfg, data=data)  # the run's config, pointed at the generated data
        self.benchmark = write_benchmark(workdir / "data" / "eval", prepared.heldout)
        self.results: dict[str, dict[str, Any]] = {}

    def stages(self) -> list[tuple[StageRecord, StageSection]]:
        """The stages the demo adds around the run's: its warm-up and its ablation."""
        demo, stages = self.cfg.demo, []
        if demo.pretrain is not None:
            stages.append((StageRecord(self.workdir / PRETRAIN_DIR, "stage2", "demo.pretrain"), demo.pretrain))
        if demo.ablation and "stage2" in self.cfg.stages:
            stages.append((StageRecord(self.workdir / ABLATION_DIR, "stage2", "stage2"), self.cfg.stage2))
        return stages

    def evaluate(self, backbone: Backbone, mesh: Mesh, label: str) -> None:
        """Score the backbone's current model on the held-out benchmark, as ``results[label]``."""
        from unime_jax.demo.benchmark import evaluate
        from unime_jax.embedder import UniME

        out = self.workdir / "eval" / label
        shutil.rmtree(out, ignore_errors=True)  # seconds to recompute, and never stale after a config change
        embedder = UniME(backbone.model, backbone.model_type, backbone.config, backbone.tokenizer, mesh=mesh)
        self.results[label] = evaluate(embedder, self.benchmark, out, label)

    def summary(self) -> str:
        """The evaluations so far, in Markdown (the exports' model cards carry it)."""
        from unime_jax.demo.report import results_table

        return (
            f"The demo's held-out scenes ({self.benchmark.root}), scored by the evaluation harness "
            "(`python -m unime_jax.eval`'s code); each value ± half its 95% interval.\n\n"
            + results_table(self.results)
        )

    def warm_up(self, backbone: Backbone, mesh: Mesh) -> Path | None:
        """Run ``demo.pretrain`` (if configured); returns its merged model's directory."""
        pretrain = self.cfg.demo.pretrain
        if pretrain is None:
            return None
        directory = self.workdir / PRETRAIN_DIR
        done = run_stage("stage2", backbone, self.cfg, mesh, directory, pretrain, label="pretrain")
        backbone.model = done.model
        self.evaluate(backbone, mesh, "pretrained")
        return directory / MERGED_DIR

    def ablation(self, backbone: Backbone, mesh: Mesh, start: Path | None) -> StageResult | None:
        """Stage 2 again from the same start without hard negatives (k=0), scored and compared with k=8."""
        if not self.cfg.demo.ablation or "stage2" not in self.cfg.stages:
            return None
        section = replace(self.cfg.stage2, loss=replace(self.cfg.stage2.loss, k=0, all_negatives=True))
        ablation = replace(backbone, model=stage_start(self.cfg, mesh, start))
        done = run_stage("stage2", ablation, self.cfg, mesh, self.workdir / ABLATION_DIR, section)
        self.evaluate(replace(ablation, model=done.model), mesh, "ablation_k0")
        self._compare_ablation()
        return done

    def _compare_ablation(self) -> None:
        """k=0 against k=8 on the same held-out rows: the difference and McNemar's exact p-value."""
        from unime_jax.demo.benchmark import METRIC_DATASETS, paired_correct
        from unime_jax.eval.stats import mcnemar_p

        comparison = {}
        for metric in METRIC_DATASETS:
            k0, k8 = (paired_correct(self.workdir / "eval" / run, metric) for run in ("ablation_k0", "after_stage2"))
            difference = self.results["ablation_k0"][metric] - self.results["after_stage2"][metric]
            comparison[metric] = {"difference": difference, "p_value": mcnemar_p(k0, k8)}
        self.results["ablation_k0"]["vs_after_stage2"] = comparison

"""Experiment tracking and profiling: the W&B writer in offline mode (no network, no account), the
error when wandb is asked for but missing, and a jax.profiler trace of chosen steps on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grain
import pytest
from helpers import hf_models
from helpers.batches import stage2_batch

from unime_jax.config import ConfigError, from_dict, to_dict
from unime_jax.conversion import load_hf_model
from unime_jax.runs.records import ConfigChangedError, StageRecord, check_unchanged, write_record
from unime_jax.runs.schema import Config
from unime_jax.sharding import make_mesh
from unime_jax.training import loop
from unime_jax.training.metrics import MetricsWriter
from unime_jax.training.optimizer import OptimizerConfig
from unime_jax.training.sections import ProfileSection, StageSection
from unime_jax.training.tasks import Stage2Config, Stage2Task
from unime_jax.training.tracking import WandbSection
from unime_jax.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
WANDB = WandbSection(project="unime-tests", name="tiny", mode="offline")


def _log(stage: Path) -> tuple[str, list[Path]]:
    run_id = (stage / "wandb" / "run_id").read_text().strip()
    return run_id, sorted((stage / "wandb").glob(f"offline-run-*-{run_id}"))


def test_wandb_offline_writes_its_run_directory_with_the_metrics_and_config(tmp_path) -> None:
    stage = tmp_path / "run" / "stage2"
    config = {"stage2": {"loss": {"tau": 0.02}}, "workdir": str(tmp_path / "run")}
    writer = MetricsWriter(stage, wandb=WANDB, label="stage2", run_config=config)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step, "lr": 1e-4}, prefix="stage2")
    writer.close()
    run_id, (run,) = _log(stage)
    log = (run / f"run-{run_id}.wandb").read_bytes()  # W&B's record log, as `wandb sync` uploads it
    assert b"stage2/loss" in log and b"stage2/lr" in log and b"tiny/stage2" in log and b"0.02" in log
    assert (stage / "metrics.jsonl").read_text().count("\n") == 3  # the JSONL and TensorBoard as before

    # A resumed stage continues the same W&B run (offline: another directory of that id, for sync,
    # unless it started within the same second).
    writer = MetricsWriter(stage, start_step=2, wandb=WANDB, label="stage2", run_config=config)
    writer.write(3, {"loss": 0.3}, prefix="stage2")
    writer.close()
    resumed_id, runs = _log(stage)
    assert resumed_id == run_id and runs and all((r / f"run-{run_id}.wandb").is_file() for r in runs)


def test_wandb_is_checked_only_when_asked_for(tmp_path) -> None:
    cfg = from_dict(Config, {"metrics": {"wandb": {"project": "p", "mode": "offline"}}})
    assert cfg.metrics.wandb == WandbSection("p", None, "offline") and Config().metrics.wandb is None
    with pytest.raises(ConfigError, match=r"metrics\.wandb\.mode"):
        from_dict(Config, {"metrics": {"wandb": {"project": "p", "mode": "sometimes"}}})
    # Without the package: one line from the CLI, before any model loads (exit 2, a config error).
    config = tmp_path / "run.yaml"
    config.write_text(f"stages: [stage2]\nworkdir: {tmp_path / 'run'}\nmetrics:\n  wandb:\n    project: p\n")
    hide_wandb = "import sys; sys.modules['wandb'] = None; from unime_jax.train import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", hide_wandb, "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: metrics.wandb is set, but the wandb package is not installed: pip install wandb "
        "(or unime-jax[wandb]), or remove metrics.wandb from the config"
    )
    assert "Traceback" not in done.stderr
    # Not asked for: no import, no error (the package may be absent).
    no_wandb = (
        "import sys; sys.modules['wandb'] = None; from unime_jax.training.metrics import MetricsWriter; "
    )
    no_wandb += f"w = MetricsWriter({str(tmp_path / 'plain')!r}); w.write(1, {{'loss': 1.0}}); w.close()"
    done = subprocess.run(
        [sys.executable, "-c", no_wandb], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr


def test_a_profile_trace_covers_the_chosen_steps(tmp_path) -> None:
    """Steps 2-3 of 4 are traced: the trace file is there once step 3 is done, not before."""
    mesh = make_mesh(data=-1)
    model = load_hf_model(hf_models.mistral(tmp_path / "mistral"), mesh, progress=False).model
    profile = ProfileSection(start_step=2, num_steps=2)
    stage = StageSection(grad_chunks=2, log_every=1, optimizer=OptimizerConfig(), profile=profile)
    trainer = Trainer(model, Stage2Task(Stage2Config(k=4)), stage, total_steps=4, mesh=mesh)
    traces = tmp_path / "stage" / "tensorboard" / "plugins" / "profile"
    seen: dict[int, int] = {}

    class Watching(MetricsWriter):
        def write(self, step: int, values: dict, prefix: str = "train") -> None:
            seen[step] = len(list(traces.glob("*/*.xplane.pb")))
            super().write(step, values, prefix)

    batches = iter(grain.MapDataset.range(10).map(lambda k: stage2_batch(16, k)).to_iter_dataset())
    writer = Watching(tmp_path / "stage")
    loop.run(trainer, trainer.init_state(seed=0), batches, writer)
    writer.close()
    assert seen == {1: 0, 2: 0, 3: 1, 4: 1}
    (trace,) = traces.glob("*/*.xplane.pb")
    assert trace.stat().st_size > 1000
    with pytest.raises(ConfigError, match=r"stage2\.profile\.num_steps.*at least 1"):
        from_dict(Config, {"stage2": {"profile": {"num_steps": 0}}})


def test_tracking_and_profiling_are_harmless_changes_to_a_trained_stage(tmp_path) -> None:
    """Another W&B project, profile window or card base model on a rerun: the stage's record still matches."""
    before = {"metrics": {"wandb": {"project": "a"}}, "stage2": {"profile": {"start_step": 2}}}
    (tmp_path / "stage2").mkdir()
    write_record(tmp_path / "stage2", to_dict(from_dict(Config, before)))
    stages = [StageRecord(tmp_path / "stage2", "stage2", "stage2")]
    after = {
        "metrics": {"wandb": {"project": "b", "mode": "offline"}},
        "stage2": {"profile": {"start_step": 5}},
    }
    check_unchanged(to_dict(from_dict(Config, after | {"export": {"base_model": "org/model"}})), stages)
    with pytest.raises(ConfigChangedError, match=r"stage2\.negatives\.mode"):
        check_unchanged(
            to_dict(from_dict(Config, before | {"stage2": {"negatives": {"mode": "data"}}})), stages
        )

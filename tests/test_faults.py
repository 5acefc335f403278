"""Faults and bad inputs through the real `python -m unime_jax.train`: every fault resumable, every bad
input a one-line message, no silent loss of work or provenance.

One short stage-1 run (a tiny random Mistral, LoRA, 4 steps, checkpoints at 2 and 4, HF and PEFT
exports) is the reference. Each fault starts from a copy of its work directory: a process killed
(SIGKILL, through a driver that kills itself at a chosen call) while merging the LoRA, while
exporting and while writing a checkpoint; a truncated newest checkpoint; a changed config; bad
numbers and data. The resumed runs must end exactly as the reference did.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.nli import triplets, write_nli_csv, write_store
from helpers.tiny_configs import MISTRAL_INIT
from safetensors.numpy import load_file

from unime_jax.data.nli import NliSource
from unime_jax.train import main

REPO = Path(__file__).resolve().parents[1]
ROWS, STEPS, BATCH = 40, 4, 8  # the batch spreads over the 8 test devices (conftest), as in the subprocesses

# Runs `python -m unime_jax.train ARGS` with MODULE.NAME replaced by a wrapper that SIGKILLs the
# process at its CALL-th call, BEFORE or AFTER running it: a kill -9 at an exact point.
KILL_DRIVER = """
import importlib, os, signal, sys
module, name, call, when = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
owner = importlib.import_module(module)
*path, attr = name.split(".")
for part in path:
    owner = getattr(owner, part)
original, calls = getattr(owner, attr), []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == call and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if len(calls) == call:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(owner, attr, dying)
from unime_jax.train import main
sys.exit(main(sys.argv[5:]))
"""


def _config(root: Path, workdir: Path, teacher: Path | None = None, csv: Path | None = None) -> Path:
    tree = {
        "stages": ["stage1"],
        "model": {"init": MISTRAL_INIT, "tokenizer": "mistral-common", "dtype": "float32"},
        "data": {
            "nli": {"csv": str(csv or root / "nli.csv"), "teacher_dir": str(teacher or root / "teacher")},
            "text": {"max_len": 16},
            "loader": {"read_threads": 0},
        },
        "stage1": {
            "steps": STEPS,
            "batch_size": BATCH,
            "save_every": 2,
            "keep_checkpoints": 3,
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
            "optimizer": {"learning_rate": 1e-3},
        },
        "workdir": str(workdir),
    }
    path = root / f"{workdir.name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _train(capsys, config: Path, *extra: str) -> tuple[int, str]:
    status = main(["--config", str(config), *extra])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    csv = write_nli_csv(root / "nli.csv", triplets(ROWS))
    write_store(root / "teacher", NliSource(csv))
    return root


@pytest.fixture(scope="module")
def straight(data) -> tuple[Path, str]:
    """The uninterrupted reference run: (workdir, its output)."""
    config = _config(data, data / "straight")
    out = io.StringIO()  # a module fixture has no capsys
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = main(["--config", str(config)])
    assert status == 0, out.getvalue()[-3000:]
    return data / "straight", out.getvalue()


def _copy(straight: Path, tmp_path: Path, *remove: str) -> Path:
    """A copy of the reference workdir without the given entries (a run stopped before them)."""
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    for name in remove:
        path = workdir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return workdir


UNFINISHED = ("stage1/merged", "stage1/adapter", "stage1/config.yaml", "export")


def _killed(config: Path, target: str, call: int = 1, when: str = "after") -> str:
    module, name = target.split(":")
    env = os.environ | {"PYTHONPATH": str(REPO)}  # conftest's 8 devices: the same numbers as in-process
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DRIVER, module, name, str(call), when, "--config", str(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _same_weights(a: Path, b: Path) -> None:
    """Two exported HF directories hold bit-identical tensors."""
    left, right = (load_file(d / "model.safetensors") for d in (a, b))
    assert left.keys() == right.keys()
    for key in left:
        np.testing.assert_array_equal(left[key], right[key], err_msg=key)


def _steps(workdir: Path) -> list[int]:
    return [
        json.loads(line)["step"] for line in (workdir / "stage1" / "metrics.jsonl").read_text().splitlines()
    ]


def test_the_reference_run_keeps_its_record_adapter_and_a_data_summary(straight):
    workdir, output = straight
    assert f"stage1: {STEPS * BATCH} samples, 0 skipped as bad (0.0%)" in output
    record = yaml.safe_load((workdir / "stage1" / "config.yaml").read_text())
    assert record["stage1"]["steps"] == STEPS and record["seed"] == 0
    assert (workdir / "stage1" / "adapter" / "adapter_model.safetensors").is_file()
    assert (workdir / "export" / "peft" / "adapter_config.json").is_file()
    assert _steps(workdir) == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# 1. Kills while writing a multi-file artefact: the rerun redoes it and ends as the reference.


def test_a_kill_while_merging_resumes(straight, data, tmp_path, capsys):
    """Killed after merged/params and before its unime_model.yaml (the window that once left a
    workdir no rerun could finish): the rerun writes the merged model again."""
    workdir = _copy(straight[0], tmp_path, *UNFINISHED)
    config = _config(data, workdir)
    _killed(config, "unime_jax.model_io:write_model_config", when="before")
    assert not (workdir / "stage1" / "merged").exists()
    status, output = _train(capsys, config)
    assert status == 0, output[-3000:]
    assert "stage1: resuming from step 4" in output
    assert not list((workdir / "stage1").glob(".merged*"))
    _same_weights(workdir / "export" / "hf", straight[0] / "export" / "hf")
    assert (workdir / "export" / "peft" / "adapter_model.safetensors").is_file()


def test_a_kill_while_exporting_resumes_with_every_export(straight, data, tmp_path, capsys):
    """Killed after the merged HF files and before the PEFT base: the rerun exports everything,
    the PEFT adapter too, although the stage itself is finished."""
    workdir = _copy(straight[0], tmp_path, "export")
    config = _config(data, workdir)
    _killed(config, "unime_jax.conversion.to_hf:export_hf")
    assert not (workdir / "export" / "hf").exists()  # never half-written
    status, output = _train(capsys, config)
    assert status == 0, output[-3000:]
    assert "stage1: finished earlier" in output
    for name in ("hf", "peft_base_hf", "peft"):
        expected = sorted(p.name for p in (straight[0] / "export" / name).iterdir())
        assert sorted(p.name for p in (workdir / "export" / name).iterdir()) == expected, name
    _same_weights(workdir / "export" / "hf", straight[0] / "export" / "hf")
    peft = load_file(workdir / "export" / "peft" / "adapter_model.safetensors")
    reference = load_file(straight[0] / "export" / "peft" / "adapter_model.safetensors")
    assert all(np.array_equal(peft[k], reference[k]) for k in reference)
    adapter = json.loads((workdir / "export" / "peft" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(workdir / "export" / "peft_base_hf")


def test_a_kill_while_writing_a_checkpoint_resumes_from_the_one_before(straight, data, tmp_path, capsys):
    workdir = _copy(straight[0], tmp_path, *UNFINISHED, "stage1/checkpoints/4")
    config = _config(data, workdir)
    _killed(config, "unime_jax.training.checkpoints:Checkpoints.save")  # the async write just begun
    assert not (workdir / "stage1" / "checkpoints" / "4" / "commit_success.txt").exists()
    status, output = _train(capsys, config)
    assert status == 0, output[-3000:]
    assert "stage1: resuming from step 2" in output
    _same_weights(workdir / "export" / "hf", straight[0] / "export" / "hf")
    assert _steps(workdir) == [1, 2, 3, 4]  # the rows the killed run wrote after step 2 are not doubled


# ---------------------------------------------------------------------------------------------
# 2. A newest checkpoint that does not restore: the one before it is used; the bad one is kept.


@pytest.mark.parametrize(
    ("damaged", "named"),
    [("state", "stage1/checkpoints/4/state"), ("meta/metadata", "stage1/checkpoints/4/meta")],
    ids=["truncated-tensors", "truncated-json"],
)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(
    straight, data, tmp_path, capsys, damaged, named
):
    workdir = _copy(straight[0], tmp_path, *UNFINISHED)
    target = workdir / "stage1" / "checkpoints" / "4" / damaged
    files = (
        [target]
        if target.is_file()
        else [p for p in target.rglob("*") if p.is_file() and p.stat().st_size > 64]
    )
    for file in files:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    status, output = _train(capsys, _config(data, workdir))
    assert status == 0, output[-3000:]
    skipped = [line for line in output.splitlines() if "skipping checkpoint" in line]
    assert len(skipped) == 1 and str(workdir / "stage1" / "checkpoints" / "4") in skipped[0], output[-3000:]
    assert "Traceback" not in output and "stage1: resuming from step 2" in output
    kept = workdir / "stage1" / "checkpoints.skipped" / "4"
    assert (
        kept.is_dir()
        and f"moved the unusable checkpoint {workdir / 'stage1' / 'checkpoints' / '4'}" in output
    )
    assert f"{workdir / named}: " in skipped[0], skipped[0]  # the item that failed, and why
    _same_weights(workdir / "export" / "hf", straight[0] / "export" / "hf")
    assert _steps(workdir) == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# 3. A changed config on a rerun: refused with each key and the flag; harmless changes pass.


def test_a_finished_workdir_refuses_changed_training_settings(straight, data, capsys):
    workdir = straight[0]
    config = _config(data, workdir)
    before = (workdir / "config.yaml").read_text(), (workdir / "stage1" / "config.yaml").read_text()
    status, output = _train(
        capsys, config, "--set", "stage1.optimizer.learning_rate=0.5", "--set", "seed=3",
        "--set", "stage1.steps=6", "--set", "stage1.lora.rank=8",
    )  # fmt: skip
    assert status == 2, output[-3000:]
    for key in ("seed", "stage1.optimizer.learning_rate", "stage1.steps", "stage1.lora.rank"):
        assert f"\n  {key}: " in output, key
    assert "--allow-change KEY" in output and "Traceback" not in output and "model      mistral" not in output
    assert ((workdir / "config.yaml").read_text(), (workdir / "stage1" / "config.yaml").read_text()) == before


def test_a_resume_refuses_a_changed_schedule_unless_forced(straight, data, tmp_path, capsys):
    workdir = _copy(straight[0], tmp_path, *UNFINISHED)
    config = _config(data, workdir)
    status, output = _train(capsys, config, "--set", "stage1.optimizer.learning_rate=0.5")
    assert status == 2 and "stage1.optimizer.learning_rate: 0.001 in its checkpoint" in output, output[-3000:]
    status, output = _train(
        capsys, config, "--set", "stage1.optimizer.learning_rate=0.5", "--set", "stage1.log_every=2",
        "--allow-change", "stage1.optimizer.learning_rate",
    )  # fmt: skip
    assert status == 0, output[-3000:]
    log = (workdir / "stage1" / "config_changes.log").read_text()
    assert "from step 4: stage1.optimizer.learning_rate: 0.001 -> 0.5 (--allow-change)" in log
    assert "log_every" not in log  # harmless: passes without a flag and without a note
    assert (
        yaml.safe_load((workdir / "stage1" / "config.yaml").read_text())["stage1"]["optimizer"][
            "learning_rate"
        ]
        == 0.5
    )


# ---------------------------------------------------------------------------------------------
# 4. Numbers and data checked at load time, each naming its key, before any model loads.


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage1.steps=-5", "stage1.steps must be at least 1, got -5 (in --set stage1.steps=-5)"),
        ("stage1.save_every=0", "stage1.save_every must be at least 1, got 0"),
        ("stage1.grad_chunks=3", "stage1.grad_chunks (3) must divide batch_size (8)"),
        ("stage1.optimizer.learning_rate=0", "stage1.optimizer.learning_rate must be above 0, got 0.0"),
        ("stage1.lora.dropout=1.5", "stage1.lora.dropout must be at least 0 and below 1, got 1.5"),
        ("data.loader.max_bad_fraction=2", "data.loader.max_bad_fraction must be at least 0 and at most 1"),
        ("stage1.batch_size=64", f"stage1.batch_size=64 is more than the {ROWS} records of data.nli.csv"),
    ],
)
def test_bad_numbers_name_their_key(data, tmp_path, capsys, override, message):
    status, output = _train(capsys, _config(data, tmp_path / "run"), "--set", override)
    assert status == 2 and f"error: {message}" in output, output[-2000:]
    assert "model      mistral" not in output and "Traceback" not in output  # found before the model loads


def test_a_missing_csv_is_found_before_the_model_loads(data, tmp_path, capsys):
    config = _config(data, tmp_path / "run", csv=tmp_path / "absent.csv")
    status, output = _train(capsys, config)
    assert status == 2 and f"error: cannot read NLI file {tmp_path / 'absent.csv'}" in output, output[-2000:]
    assert "model      mistral" not in output


# ---------------------------------------------------------------------------------------------
# 6. The NaN guard and the bad-sample limit.


def test_a_nan_streak_is_never_checkpointed(data, tmp_path, capsys):
    """Every teacher embedding is NaN: steps 1-3 are skipped; the save due at step 2 falls inside the
    streak and is not taken, and the stop names what is left."""
    teacher = tmp_path / "nan-teacher"
    embeddings = write_store(teacher, NliSource(data / "nli.csv"))
    np.lib.format.open_memmap(teacher / "embeddings.npy", mode="r+")[:] = np.nan
    assert embeddings.shape[0] == ROWS
    config = _config(data, tmp_path / "run", teacher=teacher)
    status, output = _train(capsys, config, "--set", "stage1.max_nonfinite=3", "--set", "stage1.steps=6")
    assert status == 1, output[-3000:]
    assert "error: 3 consecutive steps had NaN/inf loss or gradients (at step 3)" in output
    assert "no checkpoint was written" in output and "Traceback" not in output
    assert not [p for p in (tmp_path / "run" / "stage1" / "checkpoints").iterdir() if p.name[0].isdigit()]


def test_a_short_run_with_half_its_samples_bad_fails_with_a_summary(data, tmp_path, capsys):
    """A run far shorter than min_samples_before_stop is judged at its end, on what it saw."""
    rows = triplets(ROWS)
    for row in rows[::2]:
        row[1] = " "  # an empty positive: a bad sample
    csv = write_nli_csv(tmp_path / "half-bad.csv", rows)
    write_store(tmp_path / "teacher", NliSource(csv))
    config = _config(data, tmp_path / "run", teacher=tmp_path / "teacher", csv=csv)
    status, output = _train(capsys, config)
    assert status == 1, output[-3000:]
    assert f"stage1: {STEPS * BATCH} samples, " in output and "skipped as bad" in output
    assert "were bad and skipped, over data.loader.max_bad_fraction=0.01: empty_text" in output
    assert not (tmp_path / "run" / "stage1" / "merged").exists()

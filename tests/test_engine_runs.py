"""Whole-run properties: exact resume in a new process, and 2 processes == 1 process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import hf_models

WORKER = Path(__file__).with_name("engine_worker.py")
REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = str(REPO)
    return env


def _run(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        env=_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return hf_models.mistral(tmp_path_factory.mktemp("engine") / "mistral")


def _losses(workdir: Path, step: int) -> list[float]:
    return json.loads((workdir / f"losses-{step}.json").read_text())


def test_resume_in_a_new_process_continues_exactly(hf_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _finish(_run("--hf-dir", str(hf_dir), "--workdir", str(straight), "--steps", "6"))
    _finish(_run("--hf-dir", str(hf_dir), "--workdir", str(resumed), "--steps", "6", "--stop-after", "3"))
    _finish(_run("--hf-dir", str(hf_dir), "--workdir", str(resumed), "--steps", "6"))
    expected = _losses(straight, 6)
    got = _losses(resumed, 3) + _losses(resumed, 6)
    assert len(expected) == len(got) == 6
    np.testing.assert_array_equal(np.array(got), np.array(expected))
    metrics = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(hf_dir, tmp_path):
    one = tmp_path / "one"
    _finish(_run("--hf-dir", str(hf_dir), "--workdir", str(one), "--steps", "3"))
    two = tmp_path / "two"
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        _run("--hf-dir", str(hf_dir), "--workdir", str(two), "--steps", "3", "--devices", "4",
             "--coordinator-address", address, "--num-processes", "2", "--process-id", str(i))
        for i in range(2)
    ]  # fmt: skip
    for proc in procs:
        _finish(proc)
    np.testing.assert_allclose(_losses(two, 3), _losses(one, 3), atol=1e-5, rtol=0)


def _two_processes(hf_dir: Path, workdir: Path, *args: str) -> list[str]:
    """Both processes' output, after each finished."""
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        _run("--hf-dir", str(hf_dir), "--workdir", str(workdir), "--devices", "4", *args,
             "--coordinator-address", address, "--num-processes", "2", "--process-id", str(i))
        for i in range(2)
    ]  # fmt: skip
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
        outputs.append(out)
    return outputs


def test_processes_agree_on_the_checkpoint_to_resume(hf_dir, tmp_path):
    """Process 1 cannot read its part of the newest checkpoint; process 0 can: both resume from the
    one before (one restoring a newer step would train out of step and hang), and it is set aside once."""
    workdir = tmp_path / "two"
    _two_processes(hf_dir, workdir, "--steps", "4", "--stop-after", "3")
    part = workdir / "checkpoints" / "3" / "data" / "process_1-of-2.json"
    part.write_text(part.read_text()[:10])
    outputs = _two_processes(hf_dir, workdir, "--steps", "4")
    assert [f"process {i} restored step 2" in out for i, out in enumerate(outputs)] == [True, True], outputs
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints.skipped").iterdir()) == ["3"]
    assert len(_losses(workdir, 4)) == 2  # steps 3 and 4, trained again from step 2


def test_packed_layout_on_two_processes_matches_the_padded_one_process_run(hf_dir, tmp_path):
    """Rows regrouped and dealt over the shards of two processes: the same losses as padded rows."""
    one = tmp_path / "one"
    _finish(_run("--hf-dir", str(hf_dir), "--workdir", str(one), "--steps", "3"))
    two = tmp_path / "two"
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        _run("--hf-dir", str(hf_dir), "--workdir", str(two), "--steps", "3", "--devices", "4", "--packed",
             "--coordinator-address", address, "--num-processes", "2", "--process-id", str(i))
        for i in range(2)
    ]  # fmt: skip
    for proc in procs:
        _finish(proc)
    np.testing.assert_allclose(_losses(two, 3), _losses(one, 3), atol=1e-5, rtol=0)


def test_one_processs_bad_data_stops_every_process(hf_dir, tmp_path):
    """Process 1's data fails its bad-sample limit while reading the third batch: both processes
    stop, the other one naming it, instead of waiting for it in a collective step (which hung)."""
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        _run("--hf-dir", str(hf_dir), "--workdir", str(tmp_path), "--steps", "4", "--devices", "4",
             "--bad-data-on", "1", "--coordinator-address", address, "--num-processes", "2", "--process-id", str(i))
        for i in range(2)
    ]  # fmt: skip
    try:
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:  # a hang (the defect) must not leave the processes behind
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [1, 1], outputs
    assert "DataError: process(es) 1 stopped the run; their output says why" in outputs[0], outputs[0][-3000:]
    assert "DataError: process 1: 3 of 4 samples were bad and skipped (test)" in outputs[1], outputs[1][-3000:]


"""The main job end to end: a shortened demo, killed mid-stage-2 and resumed, then its export.

Asserts that the killed run resumes (the warm-up and stage 1 skipped as finished, stage 2 from its
checkpoint), that stage 2's held-out retrieval (scored by the evaluation harness) is well above
chance and, beyond its 95% interval, above the untrained model,
that the run writes its results, plot and metrics, and that the exported HF directory loads in
transformers and embeds like our model.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from unime_jax.demo.prepare import I2T_QUERY
from unime_jax.embedder import UniME
from unime_jax.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize_pixels

REPO = Path(__file__).resolve().parents[1]
STAGE2_STEPS = 30
CHECKPOINT_EVERY = 10


def _command(workdir: Path) -> list[str]:
    overrides = {
        "workdir": str(workdir),
        # The demo's data and warm-up as configured (the random backbone needs them to see at all).
        "demo.eval_scenes": 128,
        "demo.ablation": "false",
        "stage1.epochs": 1,
        "stage2.steps": STAGE2_STEPS,
        "stage2.save_every": CHECKPOINT_EVERY,
    }
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    return [sys.executable, "-m", "unime_jax.train", "--config", "configs/demo.yaml", *sets]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
    return env


def _kill_after_first_stage2_checkpoint(workdir: Path) -> None:
    # Its output goes to a file: an unread pipe fills up and blocks the run on its progress bar.
    log = workdir.parent / "killed_run.log"
    with open(log, "wb") as output:
        proc = subprocess.Popen(_command(workdir), cwd=REPO, env=_env(), stdout=output, stderr=output)
        checkpoint = workdir / "stage2" / "checkpoints" / str(CHECKPOINT_EVERY)
        deadline = time.monotonic() + 900
        while (
            not (checkpoint / "commit_success.txt").exists()
            and proc.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.5)
        running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert running, f"the run ended before it could be killed: {log.read_text(errors='replace')[-3000:]}"
    assert (checkpoint / "commit_success.txt").exists(), f"no stage-2 checkpoint in time: {log}"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, str]:
    workdir = tmp_path_factory.mktemp("demo") / "run"
    _kill_after_first_stage2_checkpoint(workdir)
    done = subprocess.run(
        _command(workdir), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return workdir, done.stdout + done.stderr


def test_killed_demo_resumes_and_reports(finished):
    workdir, output = finished
    assert "pretrain: finished earlier" in output and "stage1: finished earlier" in output
    resumed = re.search(r"stage2: resuming from step (\d+)", output)
    assert resumed and CHECKPOINT_EVERY <= int(resumed.group(1)) < STAGE2_STEPS, output[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert set(results) == {"before", "pretrained", "after_stage1", "after_stage2"}
    for row in results.values():
        assert all(0.0 <= row[key] <= 1.0 for key in ("t2i_r1", "i2t_r1", "compositional_acc"))
    # Scored through the evaluation harness: its score files, for every evaluated model.
    for run in results:
        assert (workdir / "eval" / run / "mmeb" / "ShapesT2I_score.json").is_file()
        assert (workdir / "eval" / run / "retrieval" / "pairs_score.json").is_file()
    steps = [
        json.loads(line)["step"] for line in (workdir / "stage2" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps[-1] == STAGE2_STEPS
    assert (workdir / "results.png").stat().st_size > 0
    # The export's model card carries the evaluations (runs.model_card; tests/test_model_card.py has the rest).
    card = (workdir / "export" / "hf" / "README.md").read_text()
    assert "library_name: transformers" in card and "| after stage 2" in card


@pytest.mark.parametrize("metric", ["t2i_r1", "i2t_r1"])
def test_stage2_retrieves_well_above_chance_and_the_untrained_model(finished, metric):
    workdir, _ = finished
    results = json.loads((workdir / "results.json").read_text())
    trained, chance = results["after_stage2"][metric], results["before"]["chance"][metric]
    # Above the untrained model beyond noise: the two 95% intervals do not overlap.
    low_trained, high_untrained = (
        results["after_stage2"][f"{metric}_ci95"][0],
        results["before"][f"{metric}_ci95"][1],
    )
    assert trained >= 10 * chance and low_trained > high_untrained, results


def test_export_loads_in_transformers_with_the_same_embeddings(finished):
    workdir, _ = finished
    export = workdir / "export" / "hf"
    hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(export).eval()
    ours = UniME.load(export, raw=True, progress=False)
    featurizer = ours.featurizer()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 80, 3), dtype=np.uint8))
    rows = [("a red circle to the left of a blue square", None), (I2T_QUERY, image)]
    expected = []
    for text, img in rows:
        features = featurizer(text, img)
        length = int(features["attention_mask"].sum())
        inputs = {"input_ids": torch.tensor(features["input_ids"][None, :length].astype(np.int64))}
        if img is not None:
            # Ours ship uint8 and normalise on the device; transformers takes them normalised.
            pixels = normalize_pixels(features["pixel_values"], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
            inputs["pixel_values"] = torch.tensor(pixels[None])
            inputs["image_sizes"] = torch.tensor(features["image_sizes"][None].astype(np.int64))
        with torch.no_grad():
            hidden = hf(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]
        expected.append(torch.nn.functional.normalize(hidden, dim=-1).numpy())
    got = ours.encode(texts=[t for t, _ in rows], images=[i for _, i in rows], raw=True, progress=False)
    np.testing.assert_allclose(got, np.stack(expected), atol=1e-4)

"""`python -m unime_jax.train` as two processes over gloo with parameters sharded across them
(`mesh.fsdp` spanning both hosts' devices): the run trains, and its exports hold the whole model.

Process 0 alone can address only its half of every fsdp-sharded weight; the export gathers each
tensor from both processes, so `export/hf` must equal, bit for bit, what one process exports from
the same merged checkpoint.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from helpers.nli import triplets, write_nli_csv, write_store
from helpers.tiny_configs import MISTRAL_INIT
from safetensors.numpy import load_file

from unime_jax.conversion.to_hf import export_checkpoint
from unime_jax.data.nli import NliSource

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(root: Path) -> Path:
    csv = write_nli_csv(root / "nli.csv", triplets(32))
    write_store(root / "teacher", NliSource(csv))
    tree = {
        "stages": ["stage1"],
        "model": {"init": MISTRAL_INIT, "tokenizer": "mistral-common", "dtype": "float32"},
        "mesh": {"data": 1, "fsdp": -1},  # 8 devices, 4 per process: every weight spans both
        "data": {
            "nli": {"csv": str(csv), "teacher_dir": str(root / "teacher")},
            "text": {"max_len": 16},
            "loader": {"read_threads": 0},
        },
        "stage1": {
            "steps": 2,
            "batch_size": 8,
            "save_every": 2,
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
            "optimizer": {"learning_rate": 1e-3},
        },
        "workdir": str(root / "run"),
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_an_fsdp_run_over_two_processes_exports_the_whole_model(tmp_path):
    config = _config(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    address = f"127.0.0.1:{_free_port()}"
    command = [
        sys.executable,
        "-m",
        "unime_jax.train",
        "--config",
        str(config),
        "--coordinator-address",
        address,
    ]
    procs = [
        subprocess.Popen(
            [*command, "--num-processes", "2", "--process-id", str(i)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
    workdir = tmp_path / "run"
    # What one process exports from the merged checkpoint both processes wrote.
    single = tmp_path / "single"
    export_checkpoint(workdir / "stage1" / "merged", single, progress=False)
    exported = load_file(workdir / "export" / "hf" / "model.safetensors")
    _same_tensors(exported, load_file(single / "model.safetensors"))
    assert len(exported) == 3 + 2 * 9  # embeddings, final norm, lm_head and 9 tensors per layer
    adapter = "adapter_model.safetensors"
    _same_tensors(
        load_file(workdir / "export" / "peft" / adapter), load_file(workdir / "stage1" / "adapter" / adapter)
    )
    base = load_file(workdir / "export" / "peft_base_hf" / "model.safetensors")
    assert base.keys() == exported.keys() and all(np.isfinite(v).all() for v in base.values())
    assert (workdir / "export" / "hf" / "README.md").is_file() and (
        workdir / "export" / "peft" / "README.md"
    ).is_file()
    assert not list((workdir / "export").glob(".*"))  # no temporary directory left behind

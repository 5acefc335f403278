"""Stage 2 on text-only MMEB-format data: does the step time depend on the vision tower's size?

It should not: text rows need no pixels. The padded layout still gives every row the worst-case
tile slots, so text rows pay for CLIP; the packed layout sends text rows without tiles and runs
the tower only on real ones (none here). This runs the real train CLI (`python -m unime_jax.train`)
on a generated text-only MMEB-train subset, with a tiny random LLaVA-NeXT (2-layer Mistral LM,
the real Mistral-7B tokenizer from pip mistral-common) and two CLIP towers at 336 px: 2 layers ×
32 wide and 8 layers × 512 wide, under both layouts, and prints the median step time.

    PYTHONPATH=. python benchmarks/text_only_stage2.py [--steps 6] [--batch 16] [--json OUT]

CPU times vary with the machine; compare the rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

TOWERS = {"CLIP 2 x 32": (2, 32), "CLIP 8 x 512": (8, 512)}
LAYOUTS = ("padded", "packed")


def write_text_only_subset(root: Path, rows: int) -> None:
    """One MMEB-train subset whose queries and targets are all text (empty image paths)."""
    queries = [f"Find the answer to question {i}: what colour is object number {i}?" for i in range(rows)]
    targets = [f"Object {i} is colour {i % 7}." for i in range(rows)]
    table = pa.table(
        {"qry": queries, "qry_image_path": [""] * rows, "pos_text": targets, "pos_image_path": [""] * rows}
    )
    (root / "WebQA").mkdir(parents=True)
    pq.write_table(table, root / "WebQA" / "original-00000-of-00001.parquet")


def config(data: Path, workdir: Path, tower: tuple[int, int], layout: str, steps: int, batch: int) -> dict:
    layers, width = tower
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "image_size": 336,
        "patch_size": 14,
    }
    text = {
        "model_type": "mistral",
        "vocab_size": 32064,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "sliding_window": None,
    }
    init = {
        "model_type": "llava_next",
        "image_token_index": 32000,
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672]],  # llava-hf's first three
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vision_config": vision,
        "text_config": text,
    }
    return {
        "workdir": str(workdir),
        "stages": ["stage2"],
        "model": {"init": init, "tokenizer": "mistral-common", "dtype": "float32", "param_dtype": "float32"},
        "data": {"mmeb": {"root": str(data)}, "text": {"max_len": 64}, "loader": {"num_workers": 0}},
        "stage2": {
            "batch_size": batch,
            "steps": steps,
            "grad_chunks": 2,  # GradCache, as configs/stage2_common.yaml: packed memory stays one chunk
            "save_every": steps,
            "lora": {"enabled": True, "rank": 4, "alpha": 8.0, "dropout": 0.0},
            "layout": {"mode": layout},
            "loss": {"k": 4},
        },
        "export": {"hf": False, "peft": False},
    }


def median_step_time(workdir: Path) -> float:
    """Median step time over the steps after the first (which compiles)."""
    lines = (workdir / "stage2" / "metrics.jsonl").read_text().splitlines()
    times = [json.loads(line)["step_time_s"] for line in lines if '"step_time_s"' in line]
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="train steps per run (the first compiles)")
    parser.add_argument("--batch", type=int, default=16, help="global batch (queries)")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS), help="layouts to run")
    parser.add_argument("--json", help="also write the step times here")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mmeb"
        write_text_only_subset(data, 4 * args.batch)
        for layout in args.layouts:
            for name, tower in TOWERS.items():
                run = Path(tmp) / f"{layout}-{tower[0]}x{tower[1]}"
                path = run.with_suffix(".yaml")
                path.write_text(yaml.safe_dump(config(data, run, tower, layout, args.steps, args.batch)))
                subprocess.run(
                    [sys.executable, "-m", "unime_jax.train", "--config", str(path)],
                    check=True,
                    env=os.environ | {"TQDM_DISABLE": "1"},
                    stdout=subprocess.DEVNULL,
                )
                seconds = median_step_time(run)
                results.setdefault(layout, {})[name] = seconds
                print(f"{layout:7s} {name:13s} {seconds:.3f} s/step", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()

"""Demo results: a text table, ``results.json`` and a PNG of the loss curves and held-out metrics.

``results`` maps a run (``before``, ``pretrained``, ``after_stage1``, ``after_stage2``,
``ablation_k0``) to the metrics of :func:`unime_jax.demo.benchmark.evaluate`: each a fraction with
its 95% interval (``<metric>_ci95``), and the ``chance`` levels; ``ablation_k0`` may carry
``vs_after_stage2``, the paired comparison with the k=8 run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["METRICS", "RUNS", "load_losses", "plot", "results_table", "write_results"]

METRICS = {
    "t2i_r1": "t2i R@1",
    "i2t_r1": "i2t R@1",
    "compositional_acc": "twin acc",
    "retrieval_t2i_r1": "t2i R@1, E5-V prompts",
    "retrieval_i2t_r1": "i2t R@1, E5-V prompts",
}
RUNS = {
    "before": "before (random init)",
    "pretrained": "aligned backbone (warm-up)",
    "after_stage1": "after stage 1",
    "after_stage2": "after stage 2",
    "ablation_k0": "stage 2 ablation, k=0",
}
Results = Mapping[str, Mapping[str, Any]]


def _ordered(results: Results) -> list[str]:
    """Known runs in pipeline order, then any others; every run must hold the table's metrics."""
    for run, metrics in results.items():
        if missing := [m for m in METRICS if m not in metrics]:
            raise ValueError(f"results[{run!r}] lacks {', '.join(missing)}")
    return [r for r in RUNS if r in results] + [r for r in results if r not in RUNS]


def _chance(results: Results) -> Mapping[str, float]:
    return next((m["chance"] for m in results.values() if "chance" in m), {})


def _cell(metrics: Mapping[str, Any], metric: str) -> str:
    low_high = metrics.get(f"{metric}_ci95")
    spread = f" ±{(low_high[1] - low_high[0]) / 2:.3f}" if low_high else ""
    return f"{metrics[metric]:.3f}{spread}"


def results_table(results: Results) -> str:
    """A Markdown table, one row per run (each value ± half its 95% interval), then the chance levels
    and the k=8 / k=0 comparison when both ran."""
    label_width = max(len(RUNS.get(r, r)) for r in results) if results else 3
    cells = {run: [_cell(results[run], m) for m in METRICS] for run in _ordered(results)}
    widths = [
        max(len(label), *(len(c[i]) for c in cells.values())) for i, label in enumerate(METRICS.values())
    ]
    header = (
        "| "
        + "run".ljust(label_width)
        + " | "
        + " | ".join(v.ljust(w) for v, w in zip(METRICS.values(), widths, strict=True))
        + " |"
    )
    rule = "|" + "-" * (label_width + 2) + "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    lines = [header, rule]
    for run, row in cells.items():
        padded = " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
        lines.append("| " + RUNS.get(run, run).ljust(label_width) + " | " + padded + " |")
    if chance := _chance(results):
        levels = ", ".join(f"{METRICS[m]} {chance[m]:.3f}" for m in METRICS if m in chance)
        lines.append(f"chance (a random ranking): {levels}")
    comparison = results.get("ablation_k0", {}).get("vs_after_stage2")
    if comparison:
        parts = [
            f"{METRICS[m]} {c['difference']:+.3f} (McNemar p={c['p_value']:.2f})"
            for m, c in comparison.items()
        ]
        lines.append("k=0 minus k=8 on the same held-out rows: " + ", ".join(parts))
    return "\n".join(lines)


def write_results(workdir: str | Path, results: Results) -> Path:
    """``<workdir>/results.json``: each run's metrics (all of them, the table's three included)."""
    path = Path(workdir) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = {run: dict(results[run]) for run in _ordered(results)}
    path.write_text(json.dumps(ordered, indent=2) + "\n", encoding="utf-8")
    return path


def load_losses(metrics_file: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Loss per split from a ``metrics.jsonl``: split → (steps, losses), sorted by step.

    The file is appended to across restarts, so a step logged twice keeps its last value.
    """
    by_split: dict[str, dict[int, float]] = {}
    for line in Path(metrics_file).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        loss = record.get("loss")
        if isinstance(loss, int | float) and math.isfinite(loss):
            by_split.setdefault(record.get("split", "train"), {})[int(record["step"])] = float(loss)
    return {
        split: (sorted(points), [points[s] for s in sorted(points)]) for split, points in by_split.items()
    }


def plot(workdir: str | Path, metrics_files: Mapping[str, Path], results: Results) -> Path:
    """``<workdir>/results.png``: one loss panel per stage (``metrics_files``: stage → metrics.jsonl)
    and a bar chart of the held-out metrics per run, chance levels dashed."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    stages = {name: load_losses(path) for name, path in metrics_files.items() if Path(path).is_file()}
    fig = Figure(figsize=(4.2 * (len(stages) + 1.5), 3.8), layout="constrained")
    widths = [1.0] * len(stages) + [1.5]
    axes = fig.subplots(1, len(widths), width_ratios=widths, squeeze=False)[0]
    for ax, (stage, losses) in zip(axes[:-1], stages.items(), strict=True):
        for split, (steps, values) in losses.items():
            ax.plot(steps, values, label=split, marker="." if len(steps) < 30 else None)
        ax.set(title=f"{stage} loss", xlabel="step", ylabel="loss")
        if len(losses) > 1:
            ax.legend()
    _bars(axes[-1], results)
    path = Path(workdir) / "results.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _bars(ax: Axes, results: Results) -> None:
    runs = _ordered(results)
    width = 0.8 / max(len(runs), 1)
    for i, run in enumerate(runs):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(METRICS))]
        ax.bar(xs, [results[run][m] for m in METRICS], width, label=RUNS.get(run, run))
    chance = _chance(results)
    for j, metric in enumerate(METRICS):
        if metric in chance:
            ax.hlines(chance[metric], j - 0.45, j + 0.45, colors="black", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(METRICS)), [label.replace(", ", "\n") for label in METRICS.values()])
    ax.set(ylim=(0, 1.05), title="held-out metrics (dashed: chance)")
    ax.legend(fontsize="small")

"""MMEB aggregates, in percent as the papers print them, from per-dataset ``<Dataset>_score.json`` files.

Two "overall" numbers exist and both are reported (checked against the paper's Tables 1 and 9):

- ``overall_36``: the mean over the datasets (the standard MMEB overall, VLM2Vec's and the
  leaderboard's; over whichever of the 36 are present);
- ``overall_meta_mean``: the mean of the four meta-task means, what UniME's Table 1 calls
  "Overall" (for every row but LLaVA-OneVision). For UniME-LLaVA-1.6 the first is 63.6, the
  second 66.6.

``ind``/``ood`` are means over the in-/out-of-distribution datasets present, each meta-task key the
mean over its datasets present. Datasets outside the 36 (e.g. the demo's) are listed under
``other`` and enter none of the aggregates.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from statistics import mean
from typing import Any

from unime_jax.data.errors import DataError
from unime_jax.eval import paper
from unime_jax.eval.mmeb_tasks import META_TASKS, MMEB_DATASETS
from unime_jax.eval.runs import SCORE_SUFFIX
from unime_jax.eval.store import atomic_write_text

__all__ = ["read_scores", "summarize", "summary_markdown", "write_summary"]

AGGREGATES = ("overall_36", "overall_meta_mean", "ind", "ood", *META_TASKS)
_LABELS = {
    "overall_36": "Overall (mean of datasets, standard)",
    "overall_meta_mean": "Overall (mean of 4 meta-tasks, UniME Table 1)",
    "ind": "IND",
    "ood": "OOD",
    "classification": "Classification",
    "vqa": "VQA",
    "retrieval": "Retrieval",
    "grounding": "Grounding",
}


def _mean(values: list[float]) -> float | None:
    return mean(values) if values else None


def summarize(acc: Mapping[str, float]) -> dict[str, Any]:
    """Aggregates (percent) of per-dataset precision@1 ``acc`` (fractions, by dataset name)."""
    known = {name: 100 * value for name, value in acc.items() if name in MMEB_DATASETS}
    metas = {
        meta: _mean([v for n, v in known.items() if MMEB_DATASETS[n].meta == meta]) for meta in META_TASKS
    }
    present = [v for v in metas.values() if v is not None]
    return {
        "overall_36": _mean(list(known.values())),
        "overall_meta_mean": _mean(present),
        "ind": _mean([v for n, v in known.items() if MMEB_DATASETS[n].ind]),
        "ood": _mean([v for n, v in known.items() if not MMEB_DATASETS[n].ind]),
        **metas,
        "datasets": len(known),
        "per_dataset": {n: known[n] for n in MMEB_DATASETS if n in known},
        "other": {n: 100 * v for n, v in sorted(acc.items()) if n not in MMEB_DATASETS},
    }


def read_scores(out: Path) -> dict[str, dict[str, Any]]:
    """Every ``<Dataset>_score.json`` with an ``acc`` in ``out`` (MMEB's format), by dataset."""
    scores = {}
    for path in sorted(Path(out).glob(f"*{SCORE_SUFFIX}")):
        try:
            score = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read score file {path}: {e}") from e
        if isinstance(score, dict) and "acc" in score:
            if score["acc"] is None:  # no row could be scored; listed, never averaged
                continue
            if not isinstance(score["acc"], int | float) or not 0 <= score["acc"] <= 1:
                raise DataError(f"{path}: 'acc' must be a fraction in [0, 1], got {score['acc']!r}")
            scores[path.name[: -len(SCORE_SUFFIX)]] = score
    return scores


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _delta(value: float | None) -> str:
    if value is None:
        return "–"
    return "+0.0" if abs(value) < 0.05 else f"{value:+.1f}"


def summary_markdown(
    summary: Mapping[str, Any], scores: Mapping[str, Mapping[str, Any]], compare: str | None = None
) -> str:
    """The aggregates and per-dataset table, with a published row beside them when ``compare`` names one."""
    reference = paper.paper_summary(compare) if compare else None
    per_dataset = paper.MMEB_DATASETS.get(compare or "", {})
    head = "| | measured |" + (f" paper: {compare} | Δ |" if compare else "")
    rule = "|---|---:|" + ("---:|---:|" if compare else "")

    def line(label: str, measured: float | None, published: float | None) -> str:
        row = f"| {label} | {_cell(measured)} |"
        if compare:
            delta = None if measured is None or published is None else measured - published
            row += f" {_cell(published)} | {_delta(delta)} |"
        return row

    lines = [f"# MMEB: {summary['datasets']} of 36 datasets", "", head, rule]
    lines += [line(_LABELS[k], summary[k], reference[k] if reference else None) for k in AGGREGATES]
    lines += [
        "",
        "| dataset | meta-task | split | measured | scored rows |" + (" paper |" if compare else ""),
        "|---|---|---|---:|---:|" + ("---:|" if compare else ""),
    ]
    for name in [*summary["per_dataset"], *summary["other"]]:
        t = MMEB_DATASETS.get(name)
        score = scores[name]
        value = 100 * score["acc"]
        scored = f"{score.get('num_pred', '?')}/{score.get('num_rows', score.get('num_pred', '?'))}"
        row = f"| {name} | {t.meta if t else 'other'} | {('IND' if t.ind else 'OOD') if t else '–'} | {value:.1f} | {scored} |"
        if compare:
            row += f" {_cell(per_dataset.get(name))} |"
        lines.append(row)
    tied = {n: s["num_tied"] for n, s in scores.items() if s.get("num_tied")}
    if tied:
        counts = ", ".join(f"{n} {k}" for n, k in tied.items())
        lines += ["", f"Rows decided by a tie between different candidates (counted as hits): {counts}."]
    missing = [n for n in MMEB_DATASETS if n not in summary["per_dataset"]]
    if missing and summary["datasets"]:
        lines += ["", f"Not present ({len(missing)}): {', '.join(missing)}."]
    lines += [
        "",
        "Precision@1 in percent. A prediction is the argmax of the cosine scores over the row's own "
        "candidates; ties go to the first maximum (numpy's rule, as VLM2Vec), i.e. to the positive.",
    ]
    if reference is not None:
        lines.append(
            f"Paper: UniME Table 1 ({paper.MMEB[compare].label.split(' ', 1)[1]}); its printed Overall is "
            f"{paper.MMEB[compare].overall}. Both overalls are derived from the table"
            + (", the per-dataset column from Table 9." if per_dataset else ".")
        )
    return "\n".join(lines) + "\n"


def write_summary(out: Path, compare: str | None = None) -> dict[str, Any]:
    """``out/summary.json`` and ``out/summary.md`` from the score files in ``out``; returns the summary."""
    if compare is not None and compare not in paper.MMEB:
        raise ValueError(f"no published MMEB row {compare!r}; known: {', '.join(paper.MMEB)}")
    scores = read_scores(out)
    summary = summarize({name: score["acc"] for name, score in scores.items()})
    summary["not_fully_scored"] = {
        name: f"{s['num_pred']}/{s['num_rows']}"
        for name, s in scores.items()
        if "num_rows" in s and s["num_pred"] != s["num_rows"]
    }
    atomic_write_text(Path(out) / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(Path(out) / "summary.md", summary_markdown(summary, scores, compare))
    return summary

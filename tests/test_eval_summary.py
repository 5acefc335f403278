"""MMEB aggregation on the paper's own per-dataset numbers, `eval summarize`, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unime_jax.eval import paper
from unime_jax.eval.cli import build_parser, main
from unime_jax.eval.mmeb_tasks import MMEB_DATASETS
from unime_jax.eval.summary import summarize


def _write_scores(out: Path, percent: dict[str, float], rows: int = 1000) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, value in percent.items():
        correct = round(value * rows / 100)
        score = {"acc": correct / rows, "num_correct": correct, "num_pred": rows}
        (out / f"{name}_score.json").write_text(json.dumps(score))


def test_table_9_gives_unimes_two_overalls(tmp_path, capsys):
    """UniME-LLaVA-1.6's per-dataset numbers: 63.6 as the standard mean, 66.6 as Table 1's meta mean."""
    _write_scores(tmp_path, paper.MMEB_DATASETS["unime-llava16"])
    assert main(["summarize", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| Overall (mean of datasets, standard) | 63.6 |" in printed
    assert "| Overall (mean of 4 meta-tasks, UniME Table 1) | 66.6 |" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert round(summary["overall_36"], 1) == 63.6 and round(summary["overall_meta_mean"], 1) == 66.6
    assert summary["datasets"] == 36 and list(summary["per_dataset"]) == list(MMEB_DATASETS)
    # Table 1's meta-task columns are the means of Table 9's datasets.
    for meta in ("classification", "vqa", "retrieval", "grounding"):
        assert round(summary[meta], 1) == getattr(paper.MMEB["unime-llava16"], meta)


def test_other_rows_of_table_9_and_the_comparison(tmp_path, capsys):
    _write_scores(tmp_path, paper.MMEB_DATASETS["vlm2vec-llava16"])
    assert main(["summarize", str(tmp_path), "--compare", "vlm2vec-llava16"]) == 0
    printed = capsys.readouterr().out
    assert "| Overall (mean of datasets, standard) | 60.0 | 60.0 | +0.0 |" in printed
    assert "| Grounding | 82.6 | 82.6 | +0.0 |" in printed
    assert "| ImageNet-1K | classification | IND | 66.5 | 1000/1000 | 66.5 |" in printed


def test_partial_runs_and_datasets_outside_the_36():
    summary = summarize({"ImageNet-1K": 0.5, "Place365": 0.3, "MSCOCO_t2i": 0.8, "ShapesTwin": 0.9})
    assert summary["datasets"] == 3 and summary["other"] == {"ShapesTwin": 90.0}
    assert summary["overall_36"] == pytest.approx((50 + 30 + 80) / 3)
    assert summary["classification"] == pytest.approx(40) and summary["retrieval"] == pytest.approx(80)
    assert summary["overall_meta_mean"] == pytest.approx(60)  # the two meta-tasks present
    assert summary["ind"] == pytest.approx(65) and summary["ood"] == pytest.approx(30)
    assert summary["vqa"] is None and summary["grounding"] is None


def test_the_paper_rows_derive_both_overalls():
    onevision = paper.paper_summary("unime-llava-ov")  # its printed Overall is the standard mean
    assert round(onevision["overall_36"], 1) == paper.MMEB["unime-llava-ov"].overall == 70.7
    phi = paper.paper_summary("unime-phi35v")  # its printed Overall is the meta mean
    assert round(phi["overall_meta_mean"], 1) == paper.MMEB["unime-phi35v"].overall == 64.2
    assert round(phi["overall_36"], 1) == 61.3


def test_summarize_errors_name_the_file(tmp_path, capsys):
    assert main(["summarize", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"error: no <name>_score.json files in {tmp_path}"
    (tmp_path / "VOC2007_score.json").write_text(json.dumps({"acc": 67.0}))
    assert main(["summarize", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'VOC2007_score.json'}: 'acc' must be a fraction in [0, 1], got 67.0"


def test_compare_takes_the_rows_each_subcommand_has_numbers_for(tmp_path, capsys):
    """A row without retrieval numbers is a usage error for `eval retrieval`, before anything runs."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["retrieval", "--model", "m", "--out", str(out), "--pairs", "p.jsonl", "--compare", "clip-vitl"])
    assert exit_info.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(
        f"argument --compare: no published retrieval row 'clip-vitl'; choose from {', '.join(paper.RETRIEVAL)}"
    )
    assert "clip-vitl" in paper.MMEB and "clip-vitl" not in paper.RETRIEVAL
    parser = build_parser()
    mmeb = parser.parse_args(["mmeb", "--model", "m", "--out", "o", "--data", "d", "--compare", "clip-vitl"])
    assert mmeb.compare == "clip-vitl"
    assert parser.parse_args(["summarize", "o", "--compare", "unime-llava16"]).compare == "unime-llava16"
    with pytest.raises(SystemExit):
        parser.parse_args(["summarize", "o", "--compare", "nope"])

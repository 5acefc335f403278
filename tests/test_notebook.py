"""The Colab notebooks run top to bottom at tiny size: the demo (a shortened training run, then its
model) and the evaluation (a tiny LLaVA-NeXT on a tiny MMEB benchmark and pairs file).

Every code cell runs in order in one namespace, as in a kernel, except the pip-install cell (this
environment is already installed); the cell tagged ``parameters`` is replaced by tiny settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.eval_fixtures import write_images, write_mmeb_v1
from helpers.llava import write_tiny_llava

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "demo.ipynb"
EVAL_NOTEBOOK = REPO / "notebooks" / "evaluate.ipynb"
TINY_RUN = [
    "demo.train_scenes=64",
    "demo.eval_scenes=16",
    "demo.ablation=false",
    "demo.pretrain.steps=2",
    "stage1.epochs=1",
    "stage2.steps=2",
]


def _code_cells(notebook: Path) -> list[tuple[list[str], str]]:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return [(c["metadata"].get("tags", []), "".join(c["source"])) for c in cells if c["cell_type"] == "code"]


def _run(notebook: Path, parameters: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Execute the notebook's code cells in one namespace, ``parameters`` replacing its parameter cell."""
    monkeypatch.chdir(REPO / "notebooks")  # where Colab/Jupyter starts it
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the subprocesses: one CPU device
    namespace: dict = {"__name__": "__main__"}
    for index, (tags, source) in enumerate(_code_cells(notebook)):
        if "setup" in tags:
            continue
        if "parameters" in tags:
            source = parameters
        exec(compile(source, f"{notebook.name} code cell {index}", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("notebook", [NOTEBOOK, EVAL_NOTEBOOK], ids=lambda p: p.name)
def test_notebook_has_setup_and_parameter_cells(notebook: Path) -> None:
    tags = [t for cell_tags, _ in _code_cells(notebook) for t in cell_tags]
    assert tags.count("setup") == 1 and tags.count("parameters") == 1


def test_notebook_runs_and_retrieves_with_its_model(tmp_path, monkeypatch) -> None:
    parameters = f"WORKDIR = Path({str(tmp_path / 'run')!r})\nOVERRIDES = {TINY_RUN!r}\n"
    namespace = _run(NOTEBOOK, parameters, monkeypatch)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"before", "pretrained", "after_stage1", "after_stage2"} <= set(results)
    assert namespace["scores"].shape == (12, 12)
    assert np.allclose(np.linalg.norm(namespace["image_emb"], axis=1), 1.0, atol=1e-5)
    assert len([ax for ax in namespace["fig"].axes if ax.images]) == 9
    assert (tmp_path / "run" / "retrieval.png").stat().st_size > 0


def test_evaluation_notebook_converts_scores_and_shows_examples(tmp_path, monkeypatch, capsys) -> None:
    hf = write_tiny_llava(tmp_path / "hf")
    mmeb = tmp_path / "mmeb"
    write_mmeb_v1(mmeb)
    images = write_images(tmp_path / "pairs", 4)
    pairs = tmp_path / "pairs" / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"image": p, "captions": [f"caption {i}"]}) + "\n" for i, p in enumerate(images))
    )
    parameters = (
        f"HF_MODEL = Path({str(hf)!r})\nMMEB_ROOT = Path({str(mmeb)!r})\nDATASETS = 'VOC2007,MSCOCO_t2i'\n"
        f"PAIRS = Path({str(pairs)!r})\nMMEB_FLAGS = []\nCOMPARE = 'clip-vitl'\nWORK = Path({str(tmp_path / 'work')!r})\n"
    )
    namespace = _run(EVAL_NOTEBOOK, parameters, monkeypatch)
    work = tmp_path / "work"
    assert (work / "ckpt" / "unime_model.yaml").is_file()  # converted
    assert set(namespace["summary"]["per_dataset"]) == {"VOC2007", "MSCOCO_t2i"}
    # clip-vitl has MMEB numbers only (Table 1, not Table 2): beside the MMEB table, not the retrieval one
    assert "paper: clip-vitl" in (work / "mmeb" / "summary.md").read_text()
    assert "clip-vitl has no published retrieval numbers" in capsys.readouterr().out
    assert set(namespace["retrieval"]) == {"pairs"} and namespace["retrieval"]["pairs"]["t2i_r5"] == 100.0
    assert len([ax for ax in namespace["fig"].axes if ax.images]) >= 3
    assert (work / "examples.png").stat().st_size > 0

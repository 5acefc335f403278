"""The model card of an export, on the demo's own export path (configs/demo.yaml's model, recipe and
data, without training it): Hub metadata, recipe, data, the evaluation summary, and a transformers
snippet that embeds as unime-jax does."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from unime_jax.config import load_config
from unime_jax.embedder import UniME
from unime_jax.runs.model_card import source_license
from unime_jax.runs.schema import Config
from unime_jax.runs.stages import StageResult, load_backbone
from unime_jax.runs.train import _export
from unime_jax.sharding import make_mesh

REPO = Path(__file__).resolve().parents[1]
EVALUATION = "| run | t2i R@1 |\n|---|---|\n| after stage 2 | 0.500 ±0.100 |"


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("card") / "demo"
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"workdir={workdir}"], Config)
    mesh = make_mesh(devices=jax.devices()[:1])
    backbone = load_backbone(cfg, mesh)  # the demo's tiny random LLaVA-NeXT and Mistral tokenizer
    last = StageResult(backbone.model, None, [], workdir / "stage2")
    # The demo trains stage 2 without LoRA (lora.enabled: false), so it exports export/hf only.
    assert _export(cfg, workdir, backbone, last, None, mesh, EVALUATION) == [str(workdir / "export" / "hf")]
    return workdir / "export" / "hf"


def _card(export: Path) -> tuple[dict, str]:
    _, header, body = (export / "README.md").read_text(encoding="utf-8").split("---\n", 2)
    return yaml.safe_load(header), body


def test_the_demo_export_has_a_model_card(demo_export) -> None:
    meta, body = _card(demo_export)
    # A random-init backbone has no base model and no source license to name.
    assert meta == {
        "library_name": "transformers",
        "pipeline_tag": "feature-extraction",
        "tags": ["unime", "unime-jax", "embeddings", "multimodal", "llava_next"],
    }
    assert "a randomly initialised `llava_next` backbone" in body
    recipe = body.split("## Training recipe")[1].split("## Data")[0]
    assert [line.split(" | ")[0] for line in recipe.strip().splitlines()[2:]] == [
        "| demo warm-up",
        "| stage1",
        "| stage2",
    ]
    assert "| stage2 | 200 | 32 | 2 | 0.0001 (linear, 20 warm-up) | full fine-tuning |" in recipe
    assert "lora r=32, α=16.0, dropout 0.05" in recipe
    assert "coloured shapes" in body.split("## Data")[1]  # the generated data (the run points data: at it)
    assert EVALUATION in body.split("## Evaluation")[1].split("## Usage")[0]


def test_the_cards_transformers_snippet_embeds_as_unime_jax(demo_export) -> None:
    _, body = _card(demo_export)
    snippet = re.search(r"### transformers.*?```python\n(.*?)```", body, re.S).group(1)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # the card's own code, as a reader runs it
    text = "a red circle to the left of a blue square"
    got = namespace["embed_text"](text).numpy()[0]
    ours = UniME.load(demo_export, mesh=make_mesh(devices=jax.devices()[:1]), progress=False)
    np.testing.assert_allclose(got, ours.encode(texts=[text], progress=False)[0], atol=1e-4)


def test_source_license_comes_from_the_sources_readme(tmp_path) -> None:
    (tmp_path / "README.md").write_text(
        "---\nlicense: other\nlicense_name: llama3\nlicense_link: LICENSE\n---\n# x\n"
    )
    assert source_license(str(tmp_path)) == {
        "license": "other",
        "license_name": "llama3",
        "license_link": "LICENSE",
    }
    (tmp_path / "README.md").write_text("# no metadata\n")
    assert source_license(str(tmp_path)) == {} == source_license(None)


def test_base_model_is_a_hub_id_and_the_license_note_says_where_it_looked(tmp_path, monkeypatch) -> None:
    from unime_jax.runs.model_card import _hub_id, _license_note

    assert _hub_id("llava-hf/llava-v1.6-mistral-7b-hf") == "llava-hf/llava-v1.6-mistral-7b-hf"
    (tmp_path / "models" / "converted").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert _hub_id("models/converted") is None  # a local directory that reads like owner/name
    assert _hub_id(str(tmp_path / "models" / "converted")) is None and _hub_id(None) is None
    converted = str(tmp_path / "models" / "converted")  # converted checkpoints carry no README.md
    assert _license_note(converted, converted) == (
        f"The source model's license applies; none was found in `{tmp_path / 'models' / 'converted' / 'README.md'}`."
    )
    (tmp_path / "models" / "converted" / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    assert _license_note(converted, None) == "The source model's license applies (apache-2.0)."
    assert _license_note(None, None) == ""

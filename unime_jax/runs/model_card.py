"""The model card (``README.md``) written into ``export/hf`` and ``export/peft``.

It opens with the Hugging Face Hub's YAML metadata: ``base_model`` (``export.base_model``, else
``model.checkpoint``, when it is a Hub id: ``owner/name`` and no local path; none for a randomly
initialised backbone), ``library_name``, ``pipeline_tag``, the source's ``license`` (from the YAML
header of the source's own README.md, when it has one: an HF directory's, not a converted
checkpoint's, which carries no README.md) and ``tags``. Then the training recipe and data from the run's config, the evaluation summary when the
run evaluated the model (the demo does), and usage snippets for transformers and unime-jax.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml

from unime_jax.runs.schema import Config
from unime_jax.runs.stages import Backbone
from unime_jax.training.sections import Stage1Section, Stage2Section, StageSection

__all__ = ["CARD_FILE", "model_card", "source_license", "write_card"]

CARD_FILE = "README.md"
PAPER = "https://arxiv.org/abs/2504.17432"
REPOSITORY = "https://github.com/deepglint/UniME"
Library = Literal["transformers", "peft"]
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name


def _front_matter(readme: Path) -> dict[str, Any]:
    """The YAML block a Hub README.md opens with ({} when there is none or it does not parse)."""
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        data = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def source_license(checkpoint: str | None) -> dict[str, str]:
    """``license`` (and ``license_name``/``license_link``) of the source model's README.md, if stated."""
    if not checkpoint:
        return {}
    meta = _front_matter(Path(checkpoint) / CARD_FILE)
    return {k: str(meta[k]) for k in ("license", "license_name", "license_link") if meta.get(k)}


def _hub_id(name: str | None) -> str | None:
    """``name`` when it reads as a Hub model id (owner/name, not a path that exists here)."""
    return name if name and _HUB_ID.fullmatch(name) and not Path(name).exists() else None


def _metadata(cfg: Config, backbone: Backbone, library: Library) -> dict[str, Any]:
    base = _hub_id(cfg.export.base_model or cfg.model.checkpoint)
    tags = ["unime", "unime-jax", "embeddings", "multimodal", backbone.model_type]
    last = getattr(cfg, cfg.stages[-1]) if cfg.stages else None
    if library == "peft" and last is not None:
        tags += ["peft", last.lora.variant]
    meta: dict[str, Any] = {"base_model": base} if base else {}
    meta |= {"library_name": library, "pipeline_tag": "feature-extraction"}
    meta |= source_license(cfg.model.checkpoint)
    return meta | {"tags": tags}


def _adapters(section: StageSection) -> str:
    lora = section.lora
    if not lora.enabled:
        return "full fine-tuning"
    targets = lora.targets or f"preset {lora.preset}" + (" + vision tower" if lora.vision else "")
    quantized = ", NF4 base" if lora.quantize_base == "nf4" else ""
    return f"{lora.variant} r={lora.rank}, α={lora.alpha}, dropout {lora.dropout} ({targets}{quantized})"


def _loss(section: StageSection) -> str:
    if isinstance(section, Stage1Section):
        loss = section.loss
        return f"KD, τ={loss.tau}, {loss.candidates} candidates, KL {loss.direction.replace('_', '‖')}"
    assert isinstance(section, Stage2Section)
    loss, negatives = section.loss, section.negatives
    hard = "all in-batch negatives" if loss.all_negatives else f"top-{loss.k} in-batch"
    return f"InfoNCE, τ={loss.tau}, β={loss.beta}, {hard}; negatives: {negatives.mode} (k={negatives.k})"


def _stages(cfg: Config) -> list[tuple[str, StageSection]]:
    pretrain = [("demo warm-up", cfg.demo.pretrain)] if cfg.demo is not None and cfg.demo.pretrain else []
    return pretrain + [(stage, getattr(cfg, stage)) for stage in cfg.stages]


def _recipe(cfg: Config) -> str:
    rows = [
        "| stage | steps | batch | GradCache chunks | learning rate | adapters | loss |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for name, s in _stages(cfg):
        steps = s.steps if s.steps else f"{s.epochs} epoch(s)"
        opt = s.optimizer
        lr = f"{opt.learning_rate} ({opt.schedule}, {opt.warmup_steps} warm-up)"
        rows.append(
            f"| {name} | {steps} | {s.batch_size} | {s.grad_chunks} | {lr} | {_adapters(s)} | {_loss(s)} |"
        )
    return "\n".join(rows)


def _data(cfg: Config) -> str:
    lines = []
    data = cfg.data
    if "stage1" in cfg.stages and data.nli is not None:
        teacher = data.nli.teacher or "(named in the store's manifest)"
        lines.append(
            f"- **stage 1:** NLI triplets `{Path(data.nli.csv).name}`, teacher embeddings of {teacher}."
        )
    if data.mmeb is not None and ("stage2" in cfg.stages or cfg.demo is not None):
        mmeb = data.mmeb
        subsets = ", ".join(mmeb.subsets) if mmeb.subsets else "every subset found"
        cap = f"at most {mmeb.max_per_subset} rows each" if mmeb.max_per_subset else "all rows"
        size = f", images resized to {mmeb.image_size}²" if mmeb.image_size else ""
        lines.append(
            f"- **stage 2:** MMEB-format pairs, split `{mmeb.split}`, subsets {subsets} ({cap}{size})."
        )
    if cfg.demo is not None:
        lines.append(
            "- The data is the CPU demo's, generated: images of coloured shapes in spatial relations, their "
            "captions, and one-change hard-negative captions (`configs/demo.yaml`)."
        )
    return "\n".join(lines) or "- (no data section in the run config)"


def _transformers_snippet(path: str, backbone: Backbone, architecture: str, library: Library) -> str:
    import transformers

    if hasattr(transformers, architecture):
        load = f"transformers.{architecture}.from_pretrained({{path}})"
    else:  # a remote-code model (e.g. Phi-3.5-V)
        load = "transformers.AutoModelForCausalLM.from_pretrained({path}, trust_remote_code=True)"
    prompt = backbone.spec.templates.text if backbone.spec.templates else "{text}"
    lines = ["import torch", "import transformers"]
    if library == "peft":
        lines += [
            "from peft import PeftConfig, PeftModel",
            "",
            f'adapter = "{path}"',
            "base_path = PeftConfig.from_pretrained(adapter).base_model_name_or_path  # the weights it was trained on",
            "base = " + load.format(path="base_path"),
            "model = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()",
            "tokenizer = transformers.AutoTokenizer.from_pretrained(base_path)",
        ]
    else:
        lines += [
            "",
            f'path = "{path}"',
            "model = " + load.format(path="path") + ".eval()",
            "tokenizer = transformers.AutoTokenizer.from_pretrained(path)",
        ]
    lines += [
        f"prompt = {json.dumps(prompt)}  # UniME's text template",
        "",
        "def embed_text(text: str) -> torch.Tensor:",
        '    inputs = tokenizer(prompt.replace("{text}", text), return_tensors="pt")',
        "    with torch.no_grad():",
        "        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1][:, -1]",
        "    return torch.nn.functional.normalize(hidden.float(), dim=-1)  # the last token, L2-normalised",
        "",
        'embedding = embed_text("a red circle to the left of a blue square")',
    ]
    return "\n".join(lines)


def _unime_snippet(path: str) -> str:
    return "\n".join(
        [
            "from unime_jax import UniME",
            "",
            f'model = UniME.load("{path}")',
            'texts = model.encode(texts=["a red circle to the left of a blue square"])  # UniME\'s text template',
            'images = model.encode(images=["scene.png"])                                # and its image template',
            "scores = texts @ images.T                                                  # cosine similarities",
        ]
    )


def _license_note(checkpoint: str | None, base: str | None) -> str:
    stated = source_license(checkpoint).get("license")
    if stated:
        return f"The source model's license applies ({stated})."
    if checkpoint:  # a converted checkpoint has no README.md: say where it was looked for
        return f"The source model's license applies; none was found in `{Path(checkpoint) / CARD_FILE}`."
    return "The source model's license applies." if base else ""


def model_card(
    cfg: Config,
    backbone: Backbone,
    *,
    library: Library,
    path: str,
    architecture: str,
    evaluation: str | None = None,
    merged: str | None = None,
    adapter_base: str | None = None,
) -> str:
    """The card's text.

    Args:
      library: ``transformers`` (``export/hf``) or ``peft`` (``export/peft``).
      path: where the export is (the usage snippets load it from there).
      architecture: the exported config.json's first ``architectures`` entry.
      evaluation: a Markdown summary of the run's evaluations (None: the run evaluated nothing).
      merged: the merged HF export beside a PEFT adapter (what unime-jax loads).
      adapter_base: the weights a PEFT adapter applies to (its stage's starting point).
    """
    meta = yaml.safe_dump(_metadata(cfg, backbone, library), sort_keys=False, allow_unicode=True)
    base = cfg.export.base_model or cfg.model.checkpoint
    source = f"`{base}`" if base else f"a randomly initialised `{backbone.model_type}` backbone"
    kind = "a PEFT adapter (its last stage's LoRA)" if library == "peft" else "the merged weights"
    unime_path = merged if library == "peft" else path
    unime_usage = (
        f"```python\n{_unime_snippet(unime_path)}\n```"
        if unime_path
        else "unime-jax loads merged weights: the run writes them to export/hf with `export.hf: true`."
    )
    sections = [
        f"---\n{meta}---",
        f"# {Path(cfg.workdir).name}: a UniME embedding model ({kind})",
        f"A universal multimodal embedding model trained with unime-jax (JAX/Flax) from {source}, following "
        f"UniME ([Gu et al., 2025]({PAPER}), [code]({REPOSITORY})). An input's embedding is the final-norm "
        "hidden state of its prompt's last token, L2-normalised; cosine similarity compares texts and images. "
        + _license_note(cfg.model.checkpoint, base)
        + (
            f"\n\nThe adapter applies to the weights its stage started from, `{adapter_base}` (its "
            "adapter_config.json's base_model_name_or_path), which hold every earlier stage's training."
            if adapter_base
            else ""
        ),
        "## Training recipe",
        _recipe(cfg),
        "## Data",
        _data(cfg),
        "## Evaluation",
        evaluation
        or "This run evaluated nothing. Score the model with `python -m unime_jax.eval mmeb` or "
        "`python -m unime_jax.eval retrieval`, or with mteb (`unime_jax.integrations.mteb`).",
        "## Usage",
        "### unime-jax (texts, images and image+text)",
        unime_usage,
        "### transformers (texts; images need the backbone's image processor and the image template)",
        f"```python\n{_transformers_snippet(path, backbone, architecture, library)}\n```",
    ]
    return "\n\n".join(sections) + "\n"


def write_card(directory: Path, card: str) -> Path:
    """Write ``card`` as ``directory/README.md`` (inside an export's atomic write)."""
    out = Path(directory) / CARD_FILE
    out.write_text(card, encoding="utf-8")
    return out

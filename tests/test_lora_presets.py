"""LoRA presets: VLM2Vec's target list reaches on our models exactly what PEFT's reaches on
transformers' (and VLM2Vec's Phi-3.5-V reference), and the run config selects it by one value."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from flax import nnx
from helpers import hf_models
from helpers.onevision import write_tiny_onevision
from helpers.phi3_v_reference import RefModel, reference_clip, reference_config  # noqa: F401
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from unime_jax.backbones import spec_for, with_runtime
from unime_jax.backbones.lora_presets import VLM2VEC_MODULES
from unime_jax.conversion.mapping import hf_key
from unime_jax.model_io import abstract_model
from unime_jax.models import lora
from unime_jax.runs.stages import lora_config
from unime_jax.training.sections import LoraSection, StageSection


def _torch_model(model_type: str, root: Path) -> torch.nn.Module:
    """transformers' (or, for Phi-3.5-V, VLM2Vec's) tiny random model of a type."""
    if model_type == "phi3_v":
        return RefModel(reference_config())
    path = root / model_type
    if model_type == "llava_next":
        hf_models.llava_next(path, image_size=28, pinpoints=[[28, 56]], image_token_index=hf_models.VOCAB - 1)
        return transformers.LlavaNextForConditionalGeneration.from_pretrained(path)
    if model_type == "llava_onevision":
        return transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(write_tiny_onevision(path))
    return hf_models.load_torch(getattr(hf_models, model_type)(path))


def _peft_targets(model: torch.nn.Module) -> set[str]:
    """Module names PEFT adapts for VLM2Vec's LoraConfig target list."""
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=list(VLM2VEC_MODULES)))
    prefix = "base_model.model."
    return {name[len(prefix) :] for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def _ours(model_type: str, torch_model: torch.nn.Module) -> tuple:
    """(spec, config, model) of the same architecture; the model's weights are shapes only (targets need no values)."""
    spec = spec_for(model_type)
    cfg = with_runtime(spec.from_hf(json.loads(torch_model.config.to_json_string())), dtype="float32")
    return spec, cfg, abstract_model(spec, cfg)


@pytest.mark.parametrize(
    "model_type", ["llama", "mistral", "phi3", "llava_next", "phi3_v", "llava_onevision"]
)
def test_vlm2vec_preset_reaches_what_peft_reaches(model_type, reference_clip, tmp_path):  # noqa: F811
    torch_model = _torch_model(model_type, tmp_path)
    spec, cfg, model = _ours(model_type, torch_model)
    ours = lora.apply_lora(
        model, lora.LoRAConfig(2, 4.0, 0.0, spec.lora_targets(cfg, preset="vlm2vec")), nnx.Rngs(0)
    )
    theirs = _peft_targets(torch_model)
    # Our module paths are HF's under one of the backbone's prefix layouts (transformers 4.5x's in-memory one).
    assert any({hf_key(path, layout) for path in ours} == theirs for layout in spec.key_layouts), (
        sorted(ours)[:8],
        sorted(theirs)[:8],
    )


def _reached(model_type: str, preset: str, root: Path) -> set[str]:
    """Which kinds of module a preset reaches: 'lm:<name>' and 'tower:<name>' (layer numbers dropped)."""
    torch_model = _torch_model(model_type, root)
    spec, cfg, model = _ours(model_type, torch_model)
    paths = lora.apply_lora(
        model, lora.LoRAConfig(2, 4.0, 0.0, spec.lora_targets(cfg, preset=preset)), nnx.Rngs(0)
    )
    return {("tower:" if "vision" in path else "lm:") + path.rsplit(".", 1)[-1] for path in paths}


def test_documented_reach_per_backbone(reference_clip, tmp_path):  # noqa: F811
    """The table in unime_jax/backbones/lora_presets.py (and the README)."""
    tower = {"tower:q_proj", "tower:k_proj", "tower:v_proj", "tower:out_proj"}
    assert (
        _reached("llava_next", "vlm2vec", tmp_path)
        == {"lm:q_proj", "lm:k_proj", "lm:v_proj", "lm:o_proj", "lm:down_proj"} | tower
    )
    assert (
        _reached("phi3_v", "vlm2vec", tmp_path)
        == {"lm:qkv_proj", "lm:o_proj", "lm:gate_up_proj", "lm:down_proj"} | tower
    )
    assert (
        _reached("llava_onevision", "vlm2vec", tmp_path)
        == {"lm:q_proj", "lm:k_proj", "lm:v_proj", "lm:o_proj", "lm:down_proj"} | tower
    )
    # UniME's own default: every LM projection (Mistral's gate/up too), no tower.
    llava = {f"lm:{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    assert _reached("llava_next", "unime", tmp_path / "again") == llava


def _section(**lora_settings) -> StageSection:
    return StageSection(lora=LoraSection(rank=16, alpha=64.0, dropout=0.1, **lora_settings))


def test_run_config_selects_the_preset_and_variant(tmp_path):
    torch_model = _torch_model("llava_next", tmp_path)
    spec, cfg, _ = _ours("llava_next", torch_model)
    vlm2vec = lora_config("stage2", _section(preset="vlm2vec", variant="dora", init="gaussian"), spec, cfg)
    assert (vlm2vec.variant, vlm2vec.init) == ("dora", "gaussian")
    assert re.fullmatch(vlm2vec.targets, "vision_tower.vision_model.encoder.layers.0.self_attn.out_proj")
    assert not re.fullmatch(vlm2vec.targets, "language_model.model.layers.0.mlp.gate_proj")
    unime = lora_config("stage2", _section(), spec, cfg)
    assert (unime.variant, unime.init) == ("lora", "default")
    assert unime.targets == spec.lora_targets(cfg)
    with pytest.raises(
        ValueError, match=r"stage2\.lora\.targets is set, and so are lora\.preset or lora\.vision"
    ):
        lora_config("stage2", _section(preset="vlm2vec", targets="x"), spec, cfg)
    with pytest.raises(ValueError, match="vlm2vec LoRA preset already adapts the vision tower"):
        lora_config("stage2", _section(preset="vlm2vec", vision=True), spec, cfg)

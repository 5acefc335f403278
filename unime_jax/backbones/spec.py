"""What generic code knows about a backbone type: the :class:`BackboneSpec` its file exports.

Conversion, checkpoints, the embedder, training and evaluation ask a spec (``spec_for(model_type)``)
and never branch on the type's name: its HF config mapping and tensor-name layouts, how its inputs
are built (pixels, tile packing, placeholder ids), its prompts and image token, its tokenizer
fix-ups, where its decoder sits (LoRA targets) and its default processor settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from flax import nnx

from unime_jax.backbones.lora_presets import PRESETS, VLM2VEC_MODULES, module_names_regex
from unime_jax.backbones.torch_reference import ReferenceFn
from unime_jax.processing.featurizer import BackboneFeaturizer, BackboneInputs
from unime_jax.processing.prompts import PromptFormat, Templates

__all__ = ["BackboneSpec", "UnsupportedModelError", "with_runtime"]


class UnsupportedModelError(ValueError):
    """The HF config names a model type or option this port does not implement."""


def _no_settings(hf_dir: Path) -> dict[str, Any]:
    return {}


def _as_is(tokenizer: Any) -> Any:
    return tokenizer


@dataclass(frozen=True)
class BackboneSpec:
    """Everything specific to one HF model type.

    Args:
      model_type: HF config.json ``model_type``.
      config_cls, module_cls: our architecture dataclass and NNX module (its tree mirrors HF's).
      from_hf, to_hf: HF config.json dict <-> our config.
      key_layouts: alternative (our prefix, HF prefix) renames of tensor names; the first is what
        export writes (transformers 4 and 5 save some types differently).
      aliases: regexes of HF keys that duplicate another tensor (e.g. a tied copy), skipped on import.
      processor_settings: config fields an HF directory keeps beside config.json (e.g. Phi-3.5-V's
        ``num_crops`` in preprocessor_config.json), read when it is converted.
      templates: UniME's "in one word" prompts and the image placeholder; None: not an embedder.
      inputs: the input strategy for a config (arrays per input, token ids, image processing).
      prepare_tokenizer: fix-ups a loaded tokenizer needs (e.g. adding LLaVA's ``<image>``).
      lm_targets: regex of the decoder's attention and MLP projections, for a config (LoRA).
      vision_targets: regex of the vision tower's attention projections (LoRA on the tower).
      vision_tower: dotted module path of the vision tower (what ``tile_features`` runs): the
        packed training layout runs it without gradients, so nothing under it may be trained.
      mmeb_max_len: the text budget of the official MMEB evaluation command for this backbone.
      reference: loads the PyTorch model of an HF directory (our config, a dtype name) as a function
        of our featurized inputs (``torch_reference.ReferenceFn``): ``convert verify``'s comparison.
    """

    model_type: str
    config_cls: type
    module_cls: type[nnx.Module]
    from_hf: Callable[[dict], Any]
    to_hf: Callable[[Any], dict]
    key_layouts: tuple[tuple[tuple[str, str], ...], ...] = ((),)
    aliases: tuple[str, ...] = ()
    processor_settings: Callable[[Path], dict[str, Any]] = _no_settings
    templates: Templates | None = None
    inputs: Callable[[Any], BackboneInputs] | None = None
    prepare_tokenizer: Callable[[Any], Any] = _as_is
    lm_targets: Callable[[Any], str] | None = None
    vision_targets: str | None = None
    vision_tower: str | None = None
    mmeb_max_len: int = 512
    reference: Callable[[Path, Any, str], ReferenceFn] | None = None

    def lora_targets(self, cfg: Any, *, vision: bool = False, preset: str = "unime") -> str:
        """The regex of the modules to adapt.

        ``preset`` "unime": the decoder's projections (and, with ``vision``, the vision tower's
        attention: CLIP's, or SigLIP's in LLaVA-OneVision); "vlm2vec": VLM2Vec's PEFT name list,
        which reaches the tower's attention by itself and, in a Llama/Mistral/Qwen2 decoder, not
        gate_proj/up_proj (``lora_presets`` tabulates what it reaches on each backbone).
        """
        if preset not in PRESETS:
            raise ValueError(f"unknown LoRA preset {preset!r}; known: {', '.join(PRESETS)}")
        if preset == "vlm2vec":
            if vision:
                raise ValueError(
                    "the vlm2vec LoRA preset already adapts the vision tower's attention; drop vision"
                )
            return module_names_regex(VLM2VEC_MODULES)
        if self.lm_targets is None:
            raise ValueError(f"a {self.model_type} model has no language model to adapt")
        lm = self.lm_targets(cfg)
        if not vision:
            return lm
        if self.vision_targets is None:
            raise ValueError(f"a {self.model_type} model has no vision tower to adapt")
        return f"{lm}|{self.vision_targets}"

    def featurizer(
        self,
        cfg: Any,
        tokenizer: Any,
        *,
        max_len: int = 512,
        raw: bool = False,
        instruction: str | None = None,
    ) -> BackboneFeaturizer:
        """Prompts, token ids and image arrays for this backbone (UniME's templates by default)."""
        if self.templates is None or self.inputs is None:
            raise ValueError(f"a {self.model_type} model does not embed texts or images")
        prompt = PromptFormat(self.templates, raw=raw, instruction=instruction)
        return BackboneFeaturizer(self.inputs(cfg), tokenizer, prompt, max_len)


def with_runtime(cfg: Any, **changes: Any) -> Any:
    """Copy of an architecture config with run-time fields (dtype, attention, num_crops, ...) changed.

    A field the config does not have (e.g. ``num_crops`` for LLaVA-NeXT) is a ValueError naming it.
    """
    chosen = {k: v for k, v in changes.items() if v is not None}
    unknown = sorted(set(chosen) - {f.name for f in fields(cfg)})
    if unknown:
        raise ValueError(f"{type(cfg).__name__} has no setting {', '.join(unknown)}")
    return replace(cfg, **chosen)

"""LoRA adapters -> a PEFT adapter directory that `peft.PeftModel.from_pretrained` loads.

Writes `adapter_config.json` and `adapter_model.safetensors` as peft (0.21) saves them: tensor
`base_model.model.<module>.lora_A.weight` (r, in) and `....lora_B.weight` (out, r), with no
adapter name in the key; `target_modules` is the explicit list of adapted module names. A DoRA
adapter adds `....lora_magnitude_vector` (out,) and `use_dora: true`, as peft saves it.

`<module>` must be the module name *in memory* of the transformers model the adapter is loaded
onto (PEFT injects by module name before loading tensors). For Llama/Mistral/Phi-3 decoders these
are our paths unchanged. For multimodal models they may differ from ours and even from the
checkpoint's tensor names (transformers >= 4.52 loads LLaVA-NeXT's `language_model.model.*`
tensors into `model.language_model.*` modules); `layout_index` picks the `BackboneSpec.key_layouts`
prefix rename that produces the in-memory names for the transformers version in use.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from unime_jax.backbones import BackboneSpec
from unime_jax.conversion.mapping import hf_key, to_hf_array
from unime_jax.conversion.safetensors_io import write_shard
from unime_jax.models.lora import LoRAConfig, lora_modules

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PeftModel wraps a LoraModel (`base_model`) around the transformers model (`.model`).
_PEFT_PREFIX = "base_model.model."


def _check(path: str, a: np.ndarray, scale: float, cfg: LoRAConfig) -> None:
    """The adapter must be the one `cfg` describes, or PEFT would rescale it differently."""
    if a.shape[1] != cfg.rank:
        raise ValueError(f"{path}: adapter rank {a.shape[1]} differs from LoRAConfig.rank {cfg.rank}")
    if not math.isclose(scale, cfg.scale):
        raise ValueError(f"{path}: adapter scale {scale} differs from LoRAConfig alpha/rank {cfg.scale}")


def adapter_tensors(model: nnx.Module, cfg: LoRAConfig, layout: tuple[tuple[str, str], ...]) -> dict:
    """PEFT state dict (torch layouts, stored dtype) of every adapter in `model`."""
    adapters = lora_modules(model)
    if not adapters:
        raise ValueError("the model has no LoRA adapters to export (apply_lora adds them)")
    tensors: dict[str, np.ndarray] = {}
    for path, linear in adapters:
        a = np.asarray(jax.device_get(linear.lora_A.kernel.get_value()))
        b = np.asarray(jax.device_get(linear.lora_B.kernel.get_value()))
        _check(path, a, linear.lora_scale, cfg)
        if hasattr(linear, "lora_magnitude_vector") != (cfg.variant == "dora"):
            raise ValueError(f"{path}: the adapter's variant differs from LoRAConfig.variant {cfg.variant!r}")
        named = [(f"{path}.lora_A.kernel", a), (f"{path}.lora_B.kernel", b)]
        if cfg.variant == "dora":
            magnitude = linear.lora_magnitude_vector.get_value()
            named.append((f"{path}.lora_magnitude_vector", np.asarray(jax.device_get(magnitude))))
        for name, value in named:
            tensors[_PEFT_PREFIX + hf_key(name, layout)] = to_hf_array(name, value)
    return tensors


def adapter_config(
    cfg: LoRAConfig, modules: list[str], *, base_model_name_or_path: str, task_type: str | None
) -> dict:
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": modules,
        "bias": "none",
        "use_rslora": False,
        "use_dora": cfg.variant == "dora",
        "fan_in_fan_out": False,
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def export_peft(
    model: nnx.Module,
    spec: BackboneSpec,
    lora_cfg: LoRAConfig,
    out_dir: Path,
    *,
    base_model_name_or_path: str,
    layout_index: int = 0,
    task_type: str | None = None,
) -> list[str]:
    """Write `model`'s adapters as a PEFT LoRA adapter; returns the adapted (renamed) module names.

    `task_type` None loads as a plain `PeftModel` whose forward passes every argument through (as
    VLM2Vec's adapters do); "CAUSAL_LM" or "FEATURE_EXTRACTION" pick PEFT's task wrappers.
    """
    if not 0 <= layout_index < len(spec.key_layouts):
        raise ValueError(
            f"layout_index {layout_index} is out of range: {spec.model_type} has {len(spec.key_layouts)} key layout(s)"
        )
    layout = spec.key_layouts[layout_index]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(model, lora_cfg, layout)
    modules = [hf_key(path, layout) for path, _ in lora_modules(model)]
    write_shard(out / ADAPTER_WEIGHTS, tensors)
    config = adapter_config(
        lora_cfg, sorted(modules), base_model_name_or_path=base_model_name_or_path, task_type=task_type
    )
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return modules

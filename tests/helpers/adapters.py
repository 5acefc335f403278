"""Adapters through peft and back: a PEFT adapter loaded without a word, a merged model exported."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from flax import nnx
from peft import PeftModel

from helpers import hf_models
from unime_jax.conversion import export_hf
from unime_jax.conversion.to_jax import read_hf_config
from unime_jax.models import lora


def load_peft_quietly(base: torch.nn.Module, adapter: Path, caplog, **kwargs) -> PeftModel:
    """`PeftModel.from_pretrained`, asserting that it warned and logged nothing: peft reports missing
    and unexpected adapter keys that way."""
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, adapter, **kwargs)
    assert [str(w.message) for w in caught] == []
    assert caplog.records == []
    return peft_model


def merge_and_export(model: nnx.Module, loaded, hf_dir: Path, out: Path) -> torch.nn.Module:
    """Merge `model`'s adapters, export it as an HF directory with `hf_dir`'s config, load it in transformers."""
    lora.merge_lora(model)
    export_hf(model, loaded.spec, loaded.config, out, stored_hf_config=read_hf_config(hf_dir), progress=False)
    return hf_models.load_torch(out)

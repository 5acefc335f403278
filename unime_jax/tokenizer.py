"""Loading the tokenizer that goes with a backbone."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from unime_jax.backbones import spec_for

# A real tokenizer that installs offline: Mistral-7B's sentencepiece model inside the
# mistral-common wheel (LLaVA-1.6-Mistral's base tokenizer).
MISTRAL_COMMON = "mistral-common"


_LLAMA_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "legacy": False,
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}


def _mistral_common_tokenizer() -> Any:
    try:
        import mistral_common
    except ImportError as err:
        raise ImportError(
            "tokenizer 'mistral-common' needs the mistral-common package: pip install mistral-common"
        ) from err
    from transformers import AutoTokenizer

    # A tokenizer directory is what both transformers 4 and 5 build a Llama tokenizer from
    # (5 ignores a bare vocab_file argument).
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(
            Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1",
            Path(tmp) / "tokenizer.model",
        )
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(_LLAMA_TOKENIZER_CONFIG))
        return AutoTokenizer.from_pretrained(tmp)


def load_tokenizer(source: str | Path, model_type: str) -> Any:
    """A HF tokenizer from a directory (or 'mistral-common'), with the backbone's fix-ups (e.g.
    LLaVA-NeXT's ``<image>`` added when it lacks it)."""
    if str(source) == MISTRAL_COMMON:
        tokenizer = _mistral_common_tokenizer()
    else:
        path = Path(source)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer {source!r} is neither a directory nor '{MISTRAL_COMMON}'")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    return spec_for(model_type).prepare_tokenizer(tokenizer)

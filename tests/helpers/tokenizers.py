"""Real tokenizers that install offline: Mistral-7B's sentencepiece model (pip mistral-common), as
llava-hf and Phi-3-style tests use it."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

LLAVA_TEMPLATE = "[INST] {text}\nSummary above sentence in one word: [/INST]"

IMAGE_TOKEN = 32000  # <image> in llava-hf tokenizers; the id added to the Mistral tokenizer below
PHI_SPECIALS = ["<|user|>", "<|end|>", "<|assistant|>"]


def mistral_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """The real Mistral-7B sentencepiece model, as shipped inside the mistral-common wheel."""
    mistral_common = pytest.importorskip("mistral_common")
    from transformers import LlamaTokenizerFast

    vocab = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    return LlamaTokenizerFast(vocab_file=str(vocab), legacy=False)


def llava_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """The real Mistral-7B tokenizer with llava-hf's added `<image>` (id 32000)."""
    tokenizer = mistral_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    return tokenizer


def phi_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """A Llama sentencepiece tokenizer with Phi-3's chat tokens (Phi-3.5-V's is of this kind)."""
    tokenizer = mistral_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": PHI_SPECIALS})
    return tokenizer

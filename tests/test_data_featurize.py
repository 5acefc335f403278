"""TextFeaturizer with the real Mistral sentencepiece tokenizer (shipped by mistral-common, offline)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.tokenizers import LLAVA_TEMPLATE, mistral_tokenizer

from unime_jax.processing.text import TRUNCATED, TextFeaturizer


@pytest.fixture(scope="module")
def tokenizer():
    return mistral_tokenizer()


def test_right_padded_prompt_with_bos_and_no_eos(tokenizer) -> None:
    featurizer = TextFeaturizer(tokenizer, 32, LLAVA_TEMPLATE)
    out = featurizer("A dog runs.")
    n = int(out["attention_mask"].sum())
    assert out["input_ids"].shape == out["attention_mask"].shape == (32,)
    assert out["input_ids"].dtype == out["attention_mask"].dtype == np.int32
    assert out["attention_mask"][:n].all() and not out["attention_mask"][n:].any()
    assert out["input_ids"][0] == tokenizer.bos_token_id and out["input_ids"][n - 1] != tokenizer.eos_token_id
    assert (
        tokenizer.decode(out["input_ids"][:n])
        == "<s>[INST] A dog runs.\nSummary above sentence in one word: [/INST]"
    )
    assert not out[TRUNCATED]


def test_raw_texts_are_cut_like_the_tokenizers_own_truncation(tokenizer) -> None:
    """No template (MMEB's raw strings): the ids are what VLM2Vec's processor call gives."""
    text = "<|image_1|>\nFind a Wikipedia image that answers this question: " + "why is the sky blue " * 20
    ids, truncated = TextFeaturizer(tokenizer, 40).encode(text)
    assert (
        truncated and ids == tokenizer(text, truncation=True, max_length=40)["input_ids"] and len(ids) == 40
    )
    assert TextFeaturizer(tokenizer, 400).encode(text) == (tokenizer(text)["input_ids"], False)


def test_truncation_shortens_the_text_and_keeps_the_template(tokenizer) -> None:
    featurizer = TextFeaturizer(tokenizer, 24, LLAVA_TEMPLATE)
    out = featurizer("A man is playing a guitar on a small stage in the park. " * 4)
    assert out[TRUNCATED] and out["attention_mask"].sum() <= 24
    text = tokenizer.decode(out["input_ids"][: out["attention_mask"].sum()])
    assert text.startswith("<s>[INST] A man is playing") and text.endswith(
        "\nSummary above sentence in one word: [/INST]"
    )


def test_template_checks(tokenizer) -> None:
    with pytest.raises(ValueError, match="exactly once"):
        TextFeaturizer(tokenizer, 32, "no placeholder")
    with pytest.raises(ValueError, match="leaves no room for text within max_len=8"):
        TextFeaturizer(tokenizer, 8, LLAVA_TEMPLATE)
    with pytest.raises(ValueError, match="text-only"):
        TextFeaturizer(tokenizer, 32)("x", image=object())

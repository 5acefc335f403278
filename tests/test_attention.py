"""The attention wrapper: padding the sequence for cuDNN changes nothing for real tokens."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from unime_jax.models.attention import _attend_padded, resolve_implementation


@pytest.mark.parametrize(
    ("causal", "lengths", "window"), [(True, [37, 20], None), (False, None, None), (True, [37, 37], (4, 0))]
)
def test_padding_to_a_multiple_leaves_real_rows_unchanged(causal, lengths, window):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (2, 37, 4, 8))
    k = jax.random.normal(keys[1], (2, 37, 2, 8))
    v = jax.random.normal(keys[2], (2, 37, 2, 8))
    lens = None if lengths is None else np.asarray(lengths, np.int32)
    plain = _attend_padded(q, k, v, lens, causal, window, "xla", 1)
    padded = _attend_padded(q, k, v, lens, causal, window, "xla", 64)
    assert padded.shape == plain.shape
    real = np.arange(37)[None] < (np.asarray(lengths)[:, None] if lengths else np.full((2, 1), 37))
    np.testing.assert_allclose(np.asarray(padded)[real], np.asarray(plain)[real], atol=1e-6)


def test_cudnn_refuses_float32():
    with pytest.raises(ValueError, match="needs bfloat16 or float16"):
        resolve_implementation("cudnn", np.float32)
    assert resolve_implementation("auto", np.float32) == "xla"

"""The other transformers key layouts of a LLaVA-style checkpoint (LLaVA-NeXT, LLaVA-OneVision):
renames of its hub tensor names, and the check that each loads the same parameters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from helpers.tensors import tensors
from unime_jax.conversion import load_hf_model


def state_dict_v4(key: str) -> str:
    """Hub name -> name in the transformers 4.57 in-memory state_dict."""
    for old, new in (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("image_newline", "model.image_newline"),
    ):
        if key.startswith(old):
            return new + key[len(old) :]
    raise AssertionError(key)


RENAMES: dict[str, Callable[[str], str]] = {
    # transformers 5 save_pretrained flattens the vision tower (CLIP, and SigLIP from 5.6).
    "v5_saved": lambda k: k.replace("vision_tower.vision_model.", "vision_tower."),
    "v4_state_dict": state_dict_v4,
    # transformers 5 state_dict: the 4.57 names with the tower flattened.
    "v5_state_dict": lambda k: state_dict_v4(k).replace(
        "model.vision_tower.vision_model.", "model.vision_tower."
    ),
}


def assert_renamed_checkpoint_loads_the_same(
    src: Path, loaded, rename: Callable[[str], str], out: Path
) -> None:
    """`src`'s tensors saved under renamed keys (with its config.json) convert to `loaded`'s parameters."""
    (out / "config.json").write_text((src / "config.json").read_text())
    stored = tensors(src)
    renamed = {rename(k): v for k, v in stored.items()}
    assert len(renamed) == len(stored) and renamed.keys() != stored.keys()
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
    other = load_hf_model(out, progress=False)
    expected = nnx.to_flat_state(nnx.state(loaded.model))
    for (path, var), (other_path, other_var) in zip(
        expected, nnx.to_flat_state(nnx.state(other.model)), strict=True
    ):
        assert path == other_path
        np.testing.assert_array_equal(np.asarray(other_var.get_value()), np.asarray(var.get_value()))

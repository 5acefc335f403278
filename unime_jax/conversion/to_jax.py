"""HF model directory -> our model: tensors are streamed one at a time onto their target sharding."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from unime_jax.atomic import require_new_directory
from unime_jax.backbones import spec_for, with_runtime
from unime_jax.conversion.mapping import from_hf_array, plan
from unime_jax.conversion.safetensors_io import SafetensorsDir, TensorSource
from unime_jax.model_io import LoadedModel, abstract_model, save_model, variables
from unime_jax.progress import progress_bar
from unime_jax.sharding import make_mesh, state_shardings


def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir} is not a HuggingFace model directory: config.json is missing")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download or write it again") from e
    if not isinstance(hf, dict) or "model_type" not in hf:
        raise ValueError(f"{path} has no 'model_type'; cannot tell which architecture to build")
    return hf


def _place(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    # Each device (and each host) copies only its own slice of the host array.
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def load_hf_model(
    hf_dir: Path,
    mesh: Mesh | None = None,
    *,
    param_dtype: str | None = None,
    progress: bool = True,
    **runtime: str,
) -> LoadedModel:
    """Build our model from an HF directory without ever holding the weights twice in host memory.

    `param_dtype` casts floating-point weights (default: the dtype stored in the files).
    """
    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)  # first: a missing config.json or unknown model type is the clearer error
    spec = spec_for(hf["model_type"])
    return load_from_source(
        SafetensorsDir(hf_dir),
        {**hf, **spec.processor_settings(hf_dir)},
        mesh,
        param_dtype=param_dtype,
        progress=progress,
        origin=hf_dir,
        **runtime,
    )


def load_from_source(
    reader: TensorSource,
    hf: dict,
    mesh: Mesh | None = None,
    *,
    param_dtype: str | None = None,
    progress: bool = True,
    origin: Path = Path("<memory>"),
    **runtime: str,
) -> LoadedModel:
    """Build our model from HF-named tensors (files, or an in-memory state dict) and an HF config dict."""
    spec = spec_for(hf["model_type"])
    cfg = with_runtime(spec.from_hf(hf), param_dtype=param_dtype or reader.float_dtype(), **runtime)
    graphdef, abstract = nnx.split(abstract_model(spec, cfg))
    mesh = mesh or make_mesh()
    shardings = dict(variables(state_shardings(abstract, mesh)))
    targets = dict(variables(abstract))
    matched = plan(
        {name: var.get_value().shape for name, var in targets.items()},
        reader.shapes,
        spec.key_layouts,
        tied_embeddings=getattr(cfg, "tie_word_embeddings", False),
        source=str(origin),
        aliases=spec.aliases,
    )
    if matched.ignored and progress:
        print(
            f"skipping {len(matched.ignored)} recomputed buffer/alias tensor(s): {', '.join(matched.ignored)}"
        )
    dtype = jnp.dtype(cfg.param_dtype)
    for name, key in progress_bar(matched.pairs, desc="to-jax", unit="tensor", disable=not progress):
        array = from_hf_array(name, reader.get(key))
        if jnp.issubdtype(array.dtype, jnp.floating):
            array = array.astype(dtype)
        targets[name].set_value(_place(array, shardings[name].get_value()))
        del array
    return LoadedModel(nnx.merge(graphdef, abstract), spec, cfg, origin)


def convert_hf_dir(
    hf_dir: Path, out: Path, *, param_dtype: str | None = None, progress: bool = True
) -> LoadedModel:
    """`to-jax`: HF directory -> our checkpoint directory (orbax params, configs, tokenizer files)."""
    hf_dir, out = Path(hf_dir), Path(out)
    require_new_directory(out)  # before the model loads
    loaded = load_hf_model(hf_dir, param_dtype=param_dtype, progress=progress)
    save_model(
        out,
        loaded.model,
        loaded.spec.model_type,
        loaded.config,
        hf_config=read_hf_config(hf_dir),
        aux_from=hf_dir,
    )
    return loaded

"""Our model checkpoint directory: architecture config, orbax params, original HF config, tokenizer.

Layout of a converted checkpoint DIR:
    unime_model.yaml   {model_type, config}: the HF model type and our architecture dataclass
    hf_config.json     the source config.json, kept so export reproduces it exactly
    params/            orbax checkpoint: nested dict of arrays, keys = our module path
    tokenizer files    copied verbatim (tokenizer.json, tokenizer.model, ...)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import yaml
from flax import nnx
from jax.sharding import Mesh

from unime_jax.atomic import atomic_directory
from unime_jax.backbones import BackboneSpec, spec_for, with_runtime
from unime_jax.config import from_dict, to_dict
from unime_jax.sharding import make_mesh, state_shardings

MODEL_FILE = "unime_model.yaml"
HF_CONFIG_FILE = "hf_config.json"
PARAMS_DIR = "params"
# Files that travel unchanged between HF directories and ours.
AUX_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
)


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or inconsistent."""


def first_line(error: BaseException, limit: int = 400) -> str:
    """The gist of a long library error (tensorstore's run to pages): its first line, shortened."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def variables(state: nnx.State) -> Iterator[tuple[str, nnx.Variable]]:
    """(dotted module path, variable) for every leaf of a model state, in a stable order."""
    for path, var in state.flat_state():
        yield dotted(path), var


def abstract_model(spec: BackboneSpec, cfg: Any) -> nnx.Module:
    """The model with ShapeDtypeStructs in place of arrays: no memory is allocated."""
    return nnx.eval_shape(lambda: spec.module_cls(cfg, nnx.Rngs(0)))


def init_model(spec: BackboneSpec, cfg: Any, mesh: Mesh | None = None, seed: int = 0) -> nnx.Module:
    """A randomly initialised model whose parameters are created directly in their sharding."""
    mesh = mesh or make_mesh()
    graphdef, abstract = nnx.split(abstract_model(spec, cfg))
    shardings = state_shardings(abstract, mesh)

    @jax.jit
    def create() -> nnx.State:
        return nnx.split(spec.module_cls(cfg, nnx.Rngs(seed)))[1]

    state = jax.jit(create, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def write_model_config(out: Path, model_type: str, cfg: Any) -> None:
    (out / MODEL_FILE).write_text(
        yaml.safe_dump({"model_type": model_type, "config": to_dict(cfg)}, sort_keys=False)
    )


def read_model_config(ckpt: Path) -> tuple[BackboneSpec, Any]:
    path = Path(ckpt) / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{ckpt} is not a unime-jax checkpoint: {MODEL_FILE} is missing (convert it with `python -m convert to-jax`)"
        )
    try:
        raw = yaml.safe_load(path.read_text())
        spec = spec_for(raw["model_type"])
    except (yaml.YAMLError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path} is not a valid {MODEL_FILE} ({first_line(e)}); convert the model again") from e
    return spec, from_dict(spec.config_cls, raw["config"], where=str(path))


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer/processor files that exist in src; returns their names."""
    copied = []
    for name in AUX_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _check_space(directory: Path, nbytes: int, out: str | os.PathLike[str]) -> None:
    """ENOSPC before writing any tensor when the parameters cannot fit in ``directory``'s file system."""
    free = shutil.disk_usage(directory).free
    if free < nbytes:
        raise OSError(
            errno.ENOSPC,
            f"{os.strerror(errno.ENOSPC)} for the checkpoint: its parameters need {nbytes} bytes, {free} are free",
            str(out),
        )


def save_model(
    out: Path,
    model: nnx.Module,
    model_type: str,
    cfg: Any,
    hf_config: dict | None = None,
    aux_from: Path | None = None,
    tokenizer: Any | None = None,
) -> None:
    """Write a new checkpoint directory, whole or not at all: it is built under a temporary name
    and renamed into place (:func:`unime_jax.atomic.atomic_directory`), so a killed or failed
    save (a full disk) leaves no ``out`` and nothing half-written that a rerun would trip over.

    ``aux_from`` copies tokenizer files from a directory; ``tokenizer`` saves a tokenizer object.
    Raises FileExistsError when ``out`` exists and is not empty.
    """
    flat = {name: var.get_value() for name, var in variables(nnx.state(model))}
    with atomic_directory(out, collective=True) as partial:  # every process writes its shards
        _check_space(partial, sum(int(x.nbytes) for x in flat.values()), out)
        checkpointer = ocp.StandardCheckpointer()
        try:
            checkpointer.save((partial / PARAMS_DIR).absolute(), _nested(flat))
            checkpointer.wait_until_finished()
        except ValueError as e:  # tensorstore reports a full disk as RESOURCE_EXHAUSTED
            if "No space left" not in str(e):
                raise
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} while writing {out}") from e
        if jax.process_index() == 0:
            write_model_config(partial, model_type, cfg)
            if hf_config is not None:
                (partial / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
            if aux_from is not None:
                copy_aux_files(Path(aux_from), partial)
            if tokenizer is not None:
                tokenizer.save_pretrained(partial)


@dataclass
class LoadedModel:
    model: nnx.Module
    spec: BackboneSpec
    config: Any
    path: Path


def load_model(ckpt: Path, mesh: Mesh | None = None, **runtime: Any) -> LoadedModel:
    """Restore a checkpoint straight into the shardings the rules table gives on `mesh`.

    `runtime` overrides run-time config fields (dtype, attention, remat); `param_dtype` casts on load.
    """
    ckpt = Path(ckpt)
    spec, cfg = read_model_config(ckpt)
    stored_dtype = cfg.param_dtype
    cfg = with_runtime(cfg, **runtime)
    mesh = mesh or make_mesh()
    graphdef, abstract = nnx.split(abstract_model(spec, with_runtime(cfg, param_dtype=stored_dtype)))
    shardings = dict(variables(state_shardings(abstract, mesh)))
    target = {
        name: jax.ShapeDtypeStruct(
            var.get_value().shape, var.get_value().dtype, sharding=shardings[name].get_value()
        )
        for name, var in variables(abstract)
    }
    params_dir = (ckpt / PARAMS_DIR).absolute()
    if not params_dir.is_dir():
        raise CheckpointError(f"{ckpt}: {PARAMS_DIR}/ is missing; the checkpoint is incomplete")
    try:
        restored = _flatten(ocp.StandardCheckpointer().restore(params_dir, _nested(target)))
    except (ValueError, OSError, KeyError) as e:  # truncated or missing tensor files, a damaged index
        raise CheckpointError(f"cannot read the parameters in {params_dir}: {first_line(e)}") from e
    for name, var in variables(abstract):
        var.set_value(restored[name].astype(jnp.dtype(cfg.param_dtype)))
    return LoadedModel(nnx.merge(graphdef, abstract), spec, cfg, ckpt)

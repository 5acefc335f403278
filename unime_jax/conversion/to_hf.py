"""Our checkpoint -> HF directory: sharded safetensors plus a config.json transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx

from unime_jax.atomic import atomic_directory, require_new_directory
from unime_jax.backbones import BackboneSpec
from unime_jax.conversion.mapping import hf_key, to_hf_array
from unime_jax.conversion.safetensors_io import parse_size, plan_shards, shard_names, write_index, write_shard
from unime_jax.model_io import HF_CONFIG_FILE, copy_aux_files, load_model, variables
from unime_jax.progress import progress_bar
from unime_jax.sharding import host_array


def hf_config_for(spec: BackboneSpec, cfg, stored: dict | None) -> dict:
    """The source config.json when we have it (exact round trip), else one generated from our config."""
    hf = dict(stored) if stored is not None else spec.to_hf(cfg)
    hf["torch_dtype"] = cfg.param_dtype
    for sub in ("text_config", "vision_config"):  # multimodal configs record dtypes per tower too
        if isinstance(hf.get(sub), dict):
            hf[sub] = {**hf[sub], "torch_dtype": cfg.param_dtype}
    return hf


def export_hf(
    model: nnx.Module,
    spec: BackboneSpec,
    cfg,
    out: Path,
    *,
    stored_hf_config: dict | None = None,
    max_shard_bytes: int = 5 * 10**9,
    progress: bool = True,
) -> list[str]:
    """Write `model` as an HF directory, in safetensors files of at most `max_shard_bytes` (a larger
    tensor gets its own); returns the file names written.

    In a multi-host run every process calls it: tensors sharded over several hosts are gathered
    one at a time (host memory holds one shard file, not the model), and process 0 writes.
    """
    out = Path(out)
    writer = jax.process_index() == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    layout = spec.key_layouts[0]
    params = {name: var.get_value() for name, var in variables(nnx.state(model))}
    keys = {name: hf_key(name, layout) for name in params}
    shards = plan_shards(((name, params[name].nbytes) for name in params), max_shard_bytes)
    names = shard_names(len(shards))
    weight_map: dict[str, str] = {}
    bar = progress_bar(total=len(params), desc="to-hf", unit="tensor", disable=not (progress and writer))
    for file, members in zip(names, shards, strict=True):
        arrays = {n: host_array(params[n]) for n in members}  # every process: may be a collective
        if writer:
            write_shard(out / file, {keys[n]: to_hf_array(n, a) for n, a in arrays.items()})
        weight_map.update(dict.fromkeys((keys[n] for n in members), file))
        bar.update(len(members))
        del arrays
    bar.close()
    if not writer:
        return names
    if len(names) > 1:
        write_index(out, weight_map, sum(int(p.nbytes) for p in params.values()))
    (out / "config.json").write_text(json.dumps(hf_config_for(spec, cfg, stored_hf_config), indent=2))
    return names


def export_checkpoint(
    ckpt: Path, out: Path, *, max_shard_size: str = "5GB", progress: bool = True
) -> list[str]:
    """`to-hf`: our checkpoint directory -> HF directory (tokenizer files copied along), written
    under a temporary name and renamed into place: a killed or failed export leaves no ``out``."""
    ckpt, out = Path(ckpt), Path(out)
    require_new_directory(out)  # before the model loads, as a --max-shard-size typo does
    max_shard_bytes = parse_size(max_shard_size)
    loaded = load_model(ckpt)
    stored_path = ckpt / HF_CONFIG_FILE
    stored = json.loads(stored_path.read_text()) if stored_path.is_file() else None
    with atomic_directory(out) as partial:
        names = export_hf(
            loaded.model,
            loaded.spec,
            loaded.config,
            partial,
            stored_hf_config=stored,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
        )
        copy_aux_files(ckpt, partial)
    return names

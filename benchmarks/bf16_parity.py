"""bf16 parity part by part along the multimodal path: where JAX's bf16 error enters, against PyTorch's.

    PYTHONPATH=. python benchmarks/bf16_parity.py --model llava --out llava.json     # LLaVA-1.6 (transformers)
    PYTHONPATH=. python benchmarks/bf16_parity.py --model phi3v --out phi3v.json     # Phi-3.5-V (VLM2Vec's code)
    PYTHONPATH=. python benchmarks/bf16_parity.py --model llava --lm-layers 32       # full size (on a GPU)

Each model has the full CLIP ViT-L/14-336 tower and projector and a full-width language model
with `--lm-layers` layers (default 2, so that it runs on a CPU), random weights built with
transformers' own configs. The weights are rounded to bf16 once, so that every run below uses
the same values and the errors measure computation alone. One image (`--image HxW`) with a few
text tokens around it runs through:

- the reference: PyTorch in float32 (TF32 off);
- PyTorch in bf16, and unime-jax in bf16 (weights converted in memory);
- unime-jax in float32 (`--check-fp32`, at float32 matmul precision), which must match the
  reference to float32 rounding: a part further than FP32_TOL from it exits 1.

For each part the relative Frobenius error against the reference is printed:

- LLaVA-1.6: the vision tower's output (hidden_states[-2] without CLS, every tile), the projected
  features, the packed sequence (anyres layout, unpad, image_newline), the final hidden state;
- Phi-3.5-V: the vision tower's output (every crop), the image embeddings (HD layout with the
  separators, then projected), the final hidden state.

PyTorch runs its own modules part by part (each part feeds the next, as its forward does);
unime-jax runs the same parts of its model in one jitted function. The LLaVA reference is
transformers' LlavaNextForConditionalGeneration; the Phi-3.5-V reference is VLM2Vec's model code
(pip vlm2vec-for-pyserini, transformers 4.x).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import build_config, llava_config, rel_err, to_numpy

from unime_jax.backbones import spec_for, with_runtime
from unime_jax.backbones.decoder_hf import decoder_from_hf
from unime_jax.backbones.phi3_v.hf_config import phi3_v_to_hf
from unime_jax.conversion.safetensors_io import ArrayDict
from unime_jax.conversion.to_jax import load_from_source
from unime_jax.models.clip import normalize_pixels
from unime_jax.models.multimodal import gather_rows
from unime_jax.models.phi3_v import Phi3VConfig, merge_2x2
from unime_jax.sharding import make_mesh

Parts = dict[str, np.ndarray]
TEXT_TOKENS = 12  # random text ids around the image
# Largest relative error of unime-jax in float32 against the reference, per part: 2 LM layers
# measured at most 2.2e-06 on CPU (BENCHMARKS.md); a wrong weight or layout is far above it.
FP32_TOL = 1e-4


# --------------------------------------------------------------------------------------------
# Models and inputs


def _llava_hf_config(lm_layers: int) -> transformers.LlavaNextConfig:
    cfg = llava_config(tiny=False)
    cfg.text_config.num_hidden_layers = lm_layers
    return cfg


def _phi3v_hf_config(lm_layers: int):
    """Phi-3.5-mini's decoder with the CLIP-L/14-336 tower, written by our own config.json mapping."""
    from vlm2vec_for_pyserini.model.baseline_backbone.phi3_v.configuration_phi3_v import (
        Phi3VConfig as RefConfig,
    )

    text = decoder_from_hf(
        {**build_config("phi-3.5-mini", tiny=False).to_dict(), "num_hidden_layers": lm_layers}
    )
    hf = phi3_v_to_hf(Phi3VConfig(text=text, num_crops=4))
    return RefConfig.from_dict({**hf, "_attn_implementation": "eager"})


def build_torch(name: str, lm_layers: int, seed: int = 0) -> torch.nn.Module:
    """The random reference model in float32, its weights rounded to bf16 values."""
    torch.manual_seed(seed)
    if name == "llava":
        model = transformers.LlavaNextForConditionalGeneration(_llava_hf_config(lm_layers))
    else:
        from vlm2vec_for_pyserini.model.baseline_backbone.phi3_v.modeling_phi3_v import Phi3VForCausalLM

        model = Phi3VForCausalLM(_phi3v_hf_config(lm_layers))
        embedding = model.model.vision_embed_tokens
        with torch.no_grad():  # HF initialises the separators to zero
            embedding.glb_GN.normal_()
            embedding.sub_GN.normal_()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model.eval()


def build_inputs(name: str, model: torch.nn.Module, image_size: tuple[int, int], seed: int = 0) -> dict:
    """One image row with our featurizer's arrays, and the token ids both frameworks take."""
    spec = spec_for("llava_next" if name == "llava" else "phi3_v")
    if name == "phi3v":
        cfg = with_runtime(spec.from_hf(model.config.to_dict()), num_crops=4)
    else:
        cfg = spec.from_hf(model.config.to_dict())
    rng = np.random.default_rng(seed)
    strategy = spec.inputs(cfg)
    arrays, num_tokens = strategy.process(rng.integers(0, 256, (*image_size, 3), dtype=np.uint8))
    arrays["pixel_values"] = arrays["pixel_values"][: strategy.num_tiles(arrays)]  # the real tiles only
    image_ids = [cfg.image_token_index] * num_tokens if name == "llava" else [-1] * num_tokens
    text = rng.integers(3, 30000, TEXT_TOKENS).tolist()
    ids = [1, *text[: TEXT_TOKENS // 2], *image_ids, *text[TEXT_TOKENS // 2 :]]
    return {"ids": np.asarray([ids], np.int32), "arrays": {k: v[None] for k, v in arrays.items()}, "cfg": cfg}


# --------------------------------------------------------------------------------------------
# PyTorch, part by part


def _llava_torch(model: torch.nn.Module, inputs: dict, dtype: torch.dtype) -> Parts:
    m, cfg = model.model, inputs["cfg"]
    arrays = inputs["arrays"]
    tiles = normalize_pixels(arrays["pixel_values"][0], cfg.vision.image_mean, cfg.vision.image_std)
    pixels = torch.tensor(tiles).to(dtype)
    sizes = torch.tensor(arrays["image_sizes"].astype(np.int64))
    ids = torch.tensor(inputs["ids"].astype(np.int64))
    tower = m.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    projected = m.multi_modal_projector(tower)
    packed = torch.cat(m.pack_image_features([projected], sizes, "default", image_newline=m.image_newline)[0])
    embeds = m.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == cfg.image_token_index)[..., None], packed.to(embeds.dtype))
    final = m.language_model(inputs_embeds=embeds).last_hidden_state[0]
    return {
        "vision tower": tower,
        "projected features": projected,
        "packed sequence": packed,
        "final hidden state": final,
    }


def _phi3v_torch(model: torch.nn.Module, inputs: dict, dtype: torch.dtype) -> Parts:
    """VLM2Vec's forward always embeds the image itself, so its parts are caught with forward hooks."""
    emb = model.model.vision_embed_tokens
    arrays = inputs["arrays"]
    ids = torch.tensor(inputs["ids"].astype(np.int64))
    caught: Parts = {}

    def tower(module, args, output):
        caught["vision tower"] = output.hidden_states[emb.layer_idx][:, 1:]

    def image(module, args, output):
        caught["image embeddings"] = output[0][ids[0] < 0]

    hooks = [emb.img_processor.register_forward_hook(tower), emb.register_forward_hook(image)]
    try:
        out = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=[torch.tensor(arrays["pixel_values"]).to(dtype)],
            image_sizes=[torch.tensor(arrays["image_sizes"].astype(np.int64))],
            output_hidden_states=True,
            use_cache=False,
        )
    finally:
        for hook in hooks:
            hook.remove()
    return {**caught, "final hidden state": out.hidden_states[-1][0]}


def torch_parts(name: str, model: torch.nn.Module, inputs: dict, dtype: torch.dtype) -> Parts:
    """The parts in `dtype`; another dtype than the model's runs on a copy (`.to` would cast the
    model's own float buffers, e.g. rotary frequencies, for every later run)."""
    run = _llava_torch if name == "llava" else _phi3v_torch
    same = next(model.parameters()).dtype == dtype
    cast = model if same else copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        parts = run(cast, inputs, dtype)
    del cast
    gc.collect()
    return {k: v.float().numpy() for k, v in parts.items()}


# --------------------------------------------------------------------------------------------
# unime-jax, the same parts in one jitted function


def _llava_jax(model, ids: jax.Array, arrays: dict) -> dict:
    tiles = arrays["pixel_values"][0]
    tower = model.tile_features(tiles)
    projected = model.multi_modal_projector(tower)
    index = model.feature_index(model.cfg.max_image_tokens, arrays["image_sizes"], arrays["image_grids"])
    gathered = gather_rows(tower.reshape(1, -1, tower.shape[-1]), index)
    packed, count = model.pack_features(gathered, arrays["image_sizes"], arrays["image_grids"])
    final = model(
        ids,
        attention_mask=jnp.ones_like(ids),
        image_sizes=arrays["image_sizes"],
        image_grids=arrays["image_grids"],
        gathered_features=gathered,
    )
    return {
        "vision tower": tower,
        "projected features": projected,
        "packed sequence": (packed[0], count[0]),
        "final hidden state": final[0],
    }


def _phi3v_jax(model, ids: jax.Array, arrays: dict) -> dict:
    vision = model.model.vision_embed_tokens
    crops = arrays["pixel_values"][0]
    tower = vision.img_processor.hidden_state(crops, model.cfg.feature_layer)[:, 1:]
    merged = merge_2x2(tower, 2 * model.cfg.merged_side)
    index = model.feature_index(model.cfg.max_image_tokens, arrays["image_sizes"])
    gathered = gather_rows(merged.reshape(1, -1, merged.shape[-1]), index)
    image = vision.pack_features(gathered, arrays["image_sizes"])[0]
    final = model(
        ids, attention_mask=jnp.ones_like(ids), image_sizes=arrays["image_sizes"], gathered_features=gathered
    )
    count = jnp.sum(ids < 0)
    return {"vision tower": tower, "image embeddings": (image, count), "final hidden state": final[0]}


def jax_parts(name: str, model: torch.nn.Module, inputs: dict, dtype: str, attention: str) -> Parts:
    state = {k: to_numpy(v) for k, v in model.state_dict().items()}
    runtime = {"num_crops": 4} if name == "phi3v" else {}
    loaded = load_from_source(
        ArrayDict(state),
        model.config.to_dict(),
        make_mesh(devices=jax.devices()[:1]),
        param_dtype=dtype,
        dtype=dtype,
        attention=attention,
        progress=False,
        **runtime,
    )
    del state
    graphdef, params = nnx.split(loaded.model)
    run = _llava_jax if name == "llava" else _phi3v_jax

    @jax.jit
    def parts(params, ids, arrays):
        return run(nnx.merge(graphdef, params), ids, arrays)

    arrays = {k: jnp.asarray(v) for k, v in inputs["arrays"].items()}
    out = jax.device_get(parts(params, jnp.asarray(inputs["ids"]), arrays))
    del loaded, params
    gc.collect()
    result = {}
    for key, value in out.items():
        if isinstance(value, tuple):  # padded to the worst case: keep the real slots
            value = value[0][: int(value[1])]
        result[key] = np.asarray(value, np.float32)
    return result


# --------------------------------------------------------------------------------------------


def measure(name: str, lm_layers: int, image: tuple[int, int], check_fp32: bool, attention: str) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = build_torch(name, lm_layers)
    inputs = build_inputs(name, model, image)
    timings: dict[str, float] = {}

    def timed(label: str, fn: Callable[[], Parts]) -> Parts:
        tic = time.perf_counter()
        out = fn()
        timings[label] = round(time.perf_counter() - tic, 1)
        print(f"  {label}: {timings[label]} s", flush=True)
        return out

    reference = timed("pytorch fp32", lambda: torch_parts(name, model, inputs, torch.float32))
    runs = {
        "unime-jax bf16": timed(
            "unime-jax bf16", lambda: jax_parts(name, model, inputs, "bfloat16", attention)
        )
    }
    if check_fp32:
        # Full float32 matmuls (GPUs default to TF32), as the reference runs with TF32 off.
        with jax.default_matmul_precision("float32"):
            runs["unime-jax fp32"] = timed(
                "unime-jax fp32", lambda: jax_parts(name, model, inputs, "float32", "xla")
            )
    runs["pytorch bf16"] = timed("pytorch bf16", lambda: torch_parts(name, model, inputs, torch.bfloat16))
    errors = {
        run: {part: rel_err(values[part], reference[part]) for part in reference}
        for run, values in runs.items()
    }
    ratio = {part: errors["unime-jax bf16"][part] / errors["pytorch bf16"][part] for part in reference}
    return {
        "model": name,
        "lm_layers": lm_layers,
        "image": list(image),
        "sequence": int(inputs["ids"].shape[1]),
        "rel_err_vs_fp32": errors,
        "jax_over_torch": ratio,
        "seconds": timings,
    }


def table(result: dict) -> str:
    errors = result["rel_err_vs_fp32"]
    runs = list(errors)
    lines = [
        "| part | " + " | ".join(f"{run} vs fp32" for run in runs) + " | JAX / PyTorch (bf16) |",
        "|---" * (len(runs) + 2) + "|",
    ]
    for part, ratio in result["jax_over_torch"].items():
        cells = " | ".join(f"{errors[run][part]:.2e}" for run in runs)
        lines.append(f"| {part} | {cells} | {ratio:.3f} |")
    return "\n".join(lines)


def fp32_failures(result: dict) -> list[str]:
    """The parts where unime-jax in float32 is further than FP32_TOL from the reference."""
    errors = result["rel_err_vs_fp32"].get("unime-jax fp32", {})
    return [f"{part} ({err:.2e})" for part, err in errors.items() if err > FP32_TOL]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["llava", "phi3v"], required=True)
    parser.add_argument(
        "--lm-layers", type=int, default=2, help="decoder layers at full width (32 = full size)"
    )
    parser.add_argument("--image", default="336x336", help="image height x width (default 336x336)")
    parser.add_argument("--check-fp32", action="store_true", help="also run unime-jax in float32")
    parser.add_argument(
        "--attention",
        choices=["auto", "xla", "cudnn"],
        default="auto",
        help="unime-jax's bf16 attention kernel (auto: cuDNN on GPU, XLA on CPU); xla on a GPU isolates cuDNN",
    )
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()
    height, width = (int(v) for v in args.image.lower().split("x"))
    print(
        f"{args.model}: {jax.devices()[0].device_kind}, jax {jax.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {platform.processor() or platform.machine()}",
        flush=True,
    )
    result = measure(args.model, args.lm_layers, (height, width), args.check_fp32, args.attention)
    result["attention"] = args.attention
    result["versions"] = {
        "jax": jax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    result["device"] = jax.devices()[0].device_kind
    print(f"sequence {result['sequence']} tokens, LM layers {args.lm_layers}, image {args.image}")
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    failures = fp32_failures(result)
    if failures:
        print(
            f"FAIL: unime-jax fp32 is further than {FP32_TOL:.0e} from the reference at {', '.join(failures)}"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

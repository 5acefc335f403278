"""Full-size random-weight checks on one GPU: bf16 parity with transformers, and encode throughput.

    python benchmarks/gpu_check.py --out results.json          # on a GPU (H100/H200)
    python benchmarks/gpu_check.py --tiny --out /tmp/r.json    # the same code path, tiny, on CPU

For Mistral-7B and Phi-3.5-mini configs with random bf16 weights, it builds the transformers
model on the device, converts its state dict in memory with `unime_jax.conversion.to_jax.load_from_source`, and
compares final-norm hidden states over real tokens of a right-padded batch (relative Frobenius
error). Phi-3.5-mini is also checked past original_max_position_embeddings (longrope's long
factors). It then times encoding (forward + last-token pooling) in both frameworks, in the same
process, median of 6 after 2 warm-ups.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from unime_jax.conversion.safetensors_io import ArrayDict
from unime_jax.conversion.to_jax import load_from_source
from unime_jax.models import pooling
from unime_jax.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize_pixels
from unime_jax.sharding import make_mesh


def _phi_rope(head_dim: int, original: int) -> dict:
    n = head_dim // 2
    return {
        "short_factor": np.geomspace(1.08, 9.0, n).round(4).tolist(),
        "long_factor": np.geomspace(1.08, 64.84, n).round(4).tolist(),
        "original_max_position_embeddings": original,
    }


def build_config(name: str, tiny: bool) -> transformers.PretrainedConfig:
    if name == "mistral-7b":
        sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512) if tiny else dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)  # fmt: skip
        return transformers.MistralConfig(
            **sizes, max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5
        )
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=512) if tiny else dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)  # fmt: skip
    original = 64 if tiny else 4096
    rope = _phi_rope(sizes["hidden_size"] // sizes["num_attention_heads"], original)
    common = dict(
        **sizes,
        max_position_embeddings=32 * original,
        sliding_window=262144,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if "rope_parameters" in transformers.Phi3Config().to_dict():  # transformers 5
        params = {"rope_type": "longrope", "rope_theta": 10000.0, **rope}
        return transformers.Phi3Config(**common, rope_parameters=params)
    return transformers.Phi3Config(
        **common,
        original_max_position_embeddings=original,
        rope_scaling={
            "type": "longrope",
            "short_factor": rope["short_factor"],
            "long_factor": rope["long_factor"],
        },
    )


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as numpy, bf16 kept as ml_dtypes' bfloat16 (numpy has none)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _batch(vocab: int, lengths: list[int], seq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = (np.arange(seq)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return rng.integers(3, vocab, size=(len(lengths), seq)).astype(np.int32) * mask, mask


def _median_time(fn, warmup: int = 2, reps: int = 6) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def _torch_hidden(ref, ids: np.ndarray, mask: np.ndarray, device: str, **extra) -> np.ndarray:
    with torch.no_grad():
        out = ref(
            input_ids=torch.tensor(ids, device=device),
            attention_mask=torch.tensor(mask, device=device),
            output_hidden_states=True,
            **extra,
        )
    return out.hidden_states[-1].float().cpu().numpy()


def _fp32_hidden(ref, ids: np.ndarray, mask: np.ndarray, device: str, **extra) -> np.ndarray:
    """The same weights run in float32 without TF32: the reference both bf16 runs are judged by."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ref.float()
    extra = {k: v.float() if torch.is_floating_point(v) else v for k, v in extra.items()}
    hidden = _torch_hidden(ref, ids, mask, device, **extra)
    ref.to(torch.bfloat16)  # bf16 -> fp32 -> bf16 is exact
    return hidden


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Relative Frobenius error of ``a`` against the reference ``b``."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _compare(h_jax: np.ndarray, h_torch: np.ndarray, h_fp32: np.ndarray, mask: np.ndarray, seq: int) -> dict:
    """Relative Frobenius errors over real tokens: JAX vs PyTorch (both bf16), and each vs fp32."""
    real = mask.astype(bool)
    last = mask.sum(1) - 1
    rows = np.arange(len(last))
    e_torch, e_jax = h_torch[rows, last], h_jax[rows, last]
    cos = (e_torch * e_jax).sum(1) / np.linalg.norm(e_torch, axis=1) / np.linalg.norm(e_jax, axis=1)
    return {
        "seq": seq,
        "rel_err_jax_vs_torch": rel_err(h_jax[real], h_torch[real]),
        "rel_err_jax_bf16_vs_fp32": rel_err(h_jax[real], h_fp32[real]),
        "rel_err_torch_bf16_vs_fp32": rel_err(h_torch[real], h_fp32[real]),
        "max_abs_err_jax_vs_torch": float(np.abs(h_jax[real] - h_torch[real]).max()),
        "min_pooled_cosine_jax_vs_torch": float(cos.min()),
    }


def check_model(name: str, tiny: bool, device: str, attention: str, encode: bool = True) -> dict:
    cfg = build_config(name, tiny)
    torch.manual_seed(0)
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.set_default_dtype(dtype)
    with torch.device(device):
        ref = transformers.AutoModelForCausalLM.from_config(
            cfg, attn_implementation="sdpa", dtype=dtype
        ).eval()
    torch.set_default_dtype(torch.float32)
    tic = time.perf_counter()
    state = {k: to_numpy(v) for k, v in ref.state_dict().items()}
    loaded = load_from_source(
        ArrayDict(state), cfg.to_dict(), make_mesh(devices=jax.devices()[:1]), progress=False,
        dtype="float32" if tiny else "bfloat16", attention="xla" if tiny else attention,
    )  # fmt: skip
    del state
    result = {"convert_s": time.perf_counter() - tic, "params": sum(p.numel() for p in ref.parameters())}
    # Parameters are jit arguments, not closed-over constants baked into the executable.
    graphdef, params = nnx.split(loaded.model)

    @jax.jit
    def hidden_fn(params, ids, mask):
        return nnx.merge(graphdef, params)(ids, attention_mask=mask)

    @jax.jit
    def encode_fn(params, ids, mask):
        return pooling.embed(nnx.merge(graphdef, params)(ids, attention_mask=mask), mask)

    cases = {"short": (512 if not tiny else 24, [1.0, 0.8, 0.55, 0.25])}
    if name.startswith("phi"):  # past original_max_position_embeddings: longrope's long factors
        cases["long"] = (int(loaded.config.rope_scaling.original_max_position_embeddings * 1.125), [1.0, 0.9])
    for case, (seq, fractions) in cases.items():
        ids, mask = _batch(cfg.vocab_size, [max(2, int(seq * f)) for f in fractions], seq)
        h_torch = _torch_hidden(ref, ids, mask, device)
        h_jax = np.asarray(hidden_fn(params, jnp.asarray(ids), jnp.asarray(mask)).astype(jnp.float32))
        h_fp32 = _fp32_hidden(ref, ids, mask, device) if not tiny else h_torch
        result[case] = _compare(h_jax, h_torch, h_fp32, mask, seq)

    if encode:
        result.update(_encode_timing(ref, cfg, params, encode_fn, tiny, device))
    if name.startswith("phi"):
        try:
            result["w1"] = w1_train_step(ref, loaded, tiny, device)
        except Exception:
            result["w1"] = {"error": traceback.format_exc()[-3000:]}
    return result


def _encode_timing(ref, cfg, params, encode_fn, tiny: bool, device: str) -> dict:
    """W4 for a text model: 1024 sentences x 64 tokens, forward + pooling."""
    result: dict = {}
    n, seq = (1024, 64) if not tiny else (16, 16)
    ids, mask = _batch(cfg.vocab_size, [seq] * n, seq, seed=1)
    t_ids, t_mask = torch.tensor(ids, device=device), torch.tensor(mask, device=device)
    j_ids, j_mask = jnp.asarray(ids), jnp.asarray(mask)

    def torch_encode():
        with torch.no_grad():
            h = ref.model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
            e = torch.nn.functional.normalize(h[:, -1].float(), dim=-1)
        if device == "cuda":
            torch.cuda.synchronize()
        return e

    def jax_encode():
        return encode_fn(params, j_ids, j_mask).block_until_ready()

    tic = time.perf_counter()
    jax_encode()
    result["jax_encode_compile_s"] = time.perf_counter() - tic
    result["torch_encode"] = _median_time(torch_encode)
    result["jax_encode"] = _median_time(jax_encode)
    result["encode_sentences"] = n
    result["encode_speedup"] = result["torch_encode"]["median_s"] / result["jax_encode"]["median_s"]
    return result


def _w1_teacher(rows: int, dim: int) -> np.ndarray:
    t = np.random.default_rng(2).standard_normal((rows, dim)).astype(np.float32)
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def w1_train_step(ref, loaded, tiny: bool, device: str) -> dict:
    """W1: stage-1 KD step, LoRA r=32 on qkv/o/gate_up/down, 256 x 64-token sentences, self-similarity
    rows (tau 0.02) against 4096-d teacher rows; AdamW. Dropout 0 in both frameworks."""
    from peft import LoraConfig, get_peft_model

    from unime_jax.backbones.decoder_hf import lm_targets
    from unime_jax.models.lora import LoRAConfig, apply_lora, param_counts
    from unime_jax.sharding import global_batch
    from unime_jax.training.metrics import lm_flops_per_token
    from unime_jax.training.optimizer import OptimizerConfig
    from unime_jax.training.sections import StageSection
    from unime_jax.training.tasks import Stage1Config, Stage1Task
    from unime_jax.training.trainer import Trainer

    rows, seq, tau = (256, 64, 0.02) if not tiny else (8, 16, 0.02)
    ids, mask = _batch(ref.config.vocab_size, [seq] * rows, seq, seed=3)
    teacher = _w1_teacher(rows, 4096 if not tiny else 32)
    out: dict = {"rows": rows, "seq": seq}

    # PyTorch + peft.
    peft_model = get_peft_model(
        ref, LoraConfig(r=32, lora_alpha=16, lora_dropout=0.0, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    )  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-4)
    t_ids, t_mask = torch.tensor(ids, device=device), torch.tensor(mask, device=device)
    t_teacher = torch.tensor(teacher, device=device)
    eye = torch.eye(rows, dtype=torch.bool, device=device)

    def torch_step():
        hidden = peft_model.base_model.model.model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
        emb = torch.nn.functional.normalize(hidden[:, -1].float(), dim=-1)
        s = (emb @ emb.T / tau).masked_fill(eye, -torch.inf)
        t = (t_teacher @ t_teacher.T / tau).masked_fill(eye, -torch.inf)
        log_s, log_t = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
        loss = (log_t.exp() * (log_t - log_s)).masked_fill(eye, 0).sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    # Same weights and zero-initialised lora_B: both frameworks start from the same loss.
    out["torch_first_loss"] = torch_step()
    out["torch_step"] = _median_time(torch_step)
    optimizer.state.clear()  # give PyTorch's memory back before JAX allocates its own
    peft_model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.empty_cache()

    # JAX: the project's Trainer on the same weights.
    cfg = LoRAConfig(rank=32, alpha=16.0, dropout=0.0, targets=lm_targets("phi3"))
    from flax import nnx as _nnx

    apply_lora(loaded.model, cfg, _nnx.Rngs(0))
    trainable, total = param_counts(loaded.model)
    mesh = make_mesh(devices=jax.devices()[:1])
    task = Stage1Task(Stage1Config(tau=tau, candidates="self"))
    stage = StageSection(optimizer=OptimizerConfig(learning_rate=5e-4))
    trainer = Trainer(loaded.model, task, stage, total_steps=100, mesh=mesh)
    state = trainer.init_state(seed=0)
    batch = global_batch(
        {"anchor_input_ids": ids, "anchor_attention_mask": mask, "teacher_anchor": teacher}, mesh
    )
    holder = {"state": state}

    def jax_step():
        holder["state"], metrics = trainer.step(holder["state"], batch)
        return float(metrics["loss"])

    tic = time.perf_counter()
    out["jax_first_loss"] = jax_step()
    out["jax_compile_and_first_step_s"] = time.perf_counter() - tic
    out["jax_step"] = _median_time(jax_step)
    out["jax_compiles"] = trainer._step_fn._cache_size()
    out["speedup"] = out["torch_step"]["median_s"] / out["jax_step"]["median_s"]
    flops = lm_flops_per_token(total - trainable, trainable, gradcache=False) * rows * seq
    out["model_tflops_per_step"] = flops / 1e12
    out["jax_tflops_per_s"] = flops / out["jax_step"]["median_s"] / 1e12
    out["torch_tflops_per_s"] = flops / out["torch_step"]["median_s"] / 1e12
    return out


def llava_config(tiny: bool) -> transformers.LlavaNextConfig:
    if tiny:
        vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=7)  # fmt: skip
        text = build_config("mistral-7b", tiny=True)
        pinpoints, image_token = [[28, 56], [56, 28], [56, 56]], 511
    else:
        vision = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
        text = build_config("mistral-7b", tiny=False)
        text.vocab_size = 32064
        pinpoints, image_token = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], 32000
    return transformers.LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def llava_batch(cfg, rows: list[tuple[tuple[int, int], int]], seed: int) -> dict[str, np.ndarray]:
    """Right-padded LLaVA-NeXT inputs: each row = (image size, text tokens), BOS, image tokens, text."""
    from unime_jax.backbones.llava_next.images import LlavaNextImageProcessor

    vision = cfg.vision_config
    proc = LlavaNextImageProcessor(
        image_grid_pinpoints=tuple(tuple(p) for p in cfg.image_grid_pinpoints),
        crop_size=vision.image_size,
        patch_size=vision.patch_size,
    )
    rng = np.random.default_rng(seed)
    processed = [proc(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for size, _ in rows]
    ids = [
        [1]
        + [cfg.image_token_index] * p.num_tokens
        + rng.integers(3, 30000 % cfg.text_config.vocab_size, n).tolist()
        for p, (_, n) in zip(processed, rows, strict=True)
    ]
    seq = max(len(i) for i in ids)
    batch = {
        "input_ids": np.zeros((len(rows), seq), np.int32),
        "attention_mask": np.zeros((len(rows), seq), np.int32),
        "pixel_values": np.zeros(
            (len(rows), proc.max_crops, 3, vision.image_size, vision.image_size), np.float32
        ),
        "image_sizes": np.array([p.image_size for p in processed], np.int32),
        "image_grids": np.array([p.image_grid for p in processed], np.int32),
    }
    for i, (p, row) in enumerate(zip(processed, ids, strict=True)):
        batch["input_ids"][i, : len(row)] = row
        batch["attention_mask"][i, : len(row)] = 1
        # uint8 crops, normalised here because the torch reference takes them in CLIP space.
        batch["pixel_values"][i, : len(p.pixel_values)] = normalize_pixels(p.pixel_values, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)  # fmt: skip
    return batch


def llava_check(tiny: bool, device: str, attention: str, parts: str = "parity,features,encode,w2") -> dict:
    """LLaVA-1.6-Mistral-7B: bf16 parity on image+text rows, W4 encode of 8 image queries, W2 step."""
    cfg = llava_config(tiny)
    torch.manual_seed(0)
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.set_default_dtype(dtype)
    with torch.device(device):
        ref = transformers.LlavaNextForConditionalGeneration(cfg).to(dtype).eval()
    torch.set_default_dtype(torch.float32)
    state = {k: to_numpy(v) for k, v in ref.state_dict().items()}
    loaded = load_from_source(
        ArrayDict(state), cfg.to_dict(), make_mesh(devices=jax.devices()[:1]), progress=False,
        dtype="float32" if tiny else "bfloat16", attention="xla" if tiny else attention,
    )  # fmt: skip
    del state
    result: dict = {"params": sum(p.numel() for p in ref.parameters())}
    graphdef, params = nnx.split(loaded.model)

    @jax.jit
    def hidden_fn(params, batch):
        return nnx.merge(graphdef, params)(**batch)

    side = cfg.vision_config.image_size
    text = 48 if not tiny else 6
    batch = llava_batch(cfg, [((side, side), text), ((side, int(side * 1.5)), text // 2)], seed=0)
    extra = {
        "pixel_values": torch.tensor(batch["pixel_values"], device=device, dtype=dtype),
        "image_sizes": torch.tensor(batch["image_sizes"], device=device),
    }
    if "parity" in parts:
        h_torch = _torch_hidden(ref, batch["input_ids"], batch["attention_mask"], device, **extra)
        h_jax = np.asarray(
            hidden_fn(params, {k: jnp.asarray(v) for k, v in batch.items()}).astype(jnp.float32)
        )
        h_fp32 = (
            h_torch
            if tiny
            else _fp32_hidden(ref, batch["input_ids"], batch["attention_mask"], device, **extra)
        )
        seq = batch["input_ids"].shape[1]
        result["image_text"] = _compare(h_jax, h_torch, h_fp32, batch["attention_mask"], seq)
    if "features" in parts:
        result["image_features"] = _llava_feature_errors(ref, loaded.model, batch, extra, tiny)
    queries = llava_batch(cfg, [((side, side), text)] * 8, seed=1)
    t_q = {k: torch.tensor(v, device=device) for k, v in queries.items() if k != "image_grids"}
    t_q["pixel_values"] = t_q["pixel_values"].to(dtype)
    if "encode" in parts:
        result.update(_llava_encode_timing(ref, graphdef, params, queries, t_q, device))
    if "w2" in parts:
        try:
            result["w2"] = w2_train_step(ref, loaded, queries, t_q, text, tiny, device)
        except Exception:
            result["w2"] = {"error": traceback.format_exc()[-3000:]}
    return result


def _llava_feature_errors(ref, model, batch: dict, extra: dict, tiny: bool) -> dict:
    """Where the bf16 error enters: packed image features (CLIP + projector + anyres), JAX vs PyTorch vs fp32."""
    with torch.no_grad():
        torch_feats = [f.float().cpu().numpy() for f in ref.model.get_image_features(extra["pixel_values"], extra["image_sizes"])]  # fmt: skip
    packed, count = jax.jit(model.image_features)(
        jnp.asarray(batch["pixel_values"]),
        jnp.asarray(batch["image_sizes"]),
        jnp.asarray(batch["image_grids"]),
    )
    packed, count = np.asarray(packed.astype(jnp.float32)), np.asarray(count)
    ours = [packed[i, : count[i]] for i in range(len(count))]
    out = {"counts_equal": [int(c) for c in count] == [len(f) for f in torch_feats]}
    if out["counts_equal"]:
        jax_all, torch_all = np.concatenate(ours), np.concatenate(torch_feats)
        out["rel_err_jax_vs_torch"] = rel_err(jax_all, torch_all)
        if not tiny:
            ref.float()
            with torch.no_grad():
                fp32 = [f.cpu().numpy() for f in ref.model.get_image_features(extra["pixel_values"].float(), extra["image_sizes"])]  # fmt: skip
            ref.to(torch.bfloat16)
            torch.cuda.empty_cache()
            fp32_all = np.concatenate(fp32)
            out["rel_err_jax_bf16_vs_fp32"] = rel_err(jax_all, fp32_all)
            out["rel_err_torch_bf16_vs_fp32"] = rel_err(torch_all, fp32_all)
    return out


def _llava_encode_timing(ref, graphdef, params, queries: dict, t_q: dict, device: str) -> dict:
    """W4 (LLaVA): 8 image+text queries, forward + pooling."""
    result: dict = {}
    j_q = {k: jnp.asarray(v) for k, v in queries.items()}

    @jax.jit
    def encode_fn(params, batch):
        return pooling.embed(nnx.merge(graphdef, params)(**batch), batch["attention_mask"])

    def torch_encode():
        with torch.no_grad():
            h = ref.model(**t_q).last_hidden_state
            e = torch.nn.functional.normalize(h[:, -1].float(), dim=-1)
        if device == "cuda":
            torch.cuda.synchronize()
        return e

    tic = time.perf_counter()
    encode_fn(params, j_q).block_until_ready()
    result["jax_encode_compile_s"] = time.perf_counter() - tic
    result["torch_encode"] = _median_time(torch_encode)
    result["jax_encode"] = _median_time(lambda: encode_fn(params, j_q).block_until_ready())
    result["encode_queries"] = 8
    result["encode_speedup"] = result["torch_encode"]["median_s"] / result["jax_encode"]["median_s"]
    return result


def w2_train_step(ref, loaded, queries: dict, t_q: dict, text: int, tiny: bool, device: str) -> dict:
    """W2: stage-2 step, LoRA r=16 on the LM's q/k/v/o/gate/up/down (vision tower and projector frozen),
    8 image+text queries, 8 text targets x 48 tokens, in-batch hard negatives, tau 0.02.

    With 8 rows there are only 7 in-batch candidates, so k=7; and the false-negative filter is
    disabled (beta=10) because on random weights it empties rows, where the released PyTorch loss
    re-selects filtered candidates and ours duplicates valid ones. Then both frameworks pick the same
    negatives and their first losses must agree; the filter's cost is negligible either way."""
    from peft import LoraConfig, get_peft_model

    from unime_jax.backbones.decoder_hf import lm_targets
    from unime_jax.models.lora import LoRAConfig, apply_lora, param_counts
    from unime_jax.sharding import global_batch
    from unime_jax.training.metrics import lm_flops_per_token
    from unime_jax.training.optimizer import OptimizerConfig
    from unime_jax.training.sections import StageSection
    from unime_jax.training.tasks import Stage2Config, Stage2Task
    from unime_jax.training.trainer import Trainer

    rows, tau, beta, k = 8, 0.02, 10.0, 7
    t_ids, t_mask = _batch(ref.config.text_config.vocab_size, [text] * rows, text, seed=4)
    out: dict = {
        "rows": rows,
        "query_tokens": int(queries["attention_mask"].sum()),
        "target_tokens": rows * text,
    }
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    peft_model = get_peft_model(
        ref, LoraConfig(r=16, lora_alpha=64, lora_dropout=0.0, target_modules=targets)
    )
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-5)
    tt_ids, tt_mask = torch.tensor(t_ids, device=device), torch.tensor(t_mask, device=device)
    eye = torch.eye(rows, dtype=torch.bool, device=device)
    inner = peft_model.base_model.model.model

    def pooled(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        last = mask.sum(1) - 1
        return torch.nn.functional.normalize(h[torch.arange(len(last)), last].float(), dim=-1)

    def torch_step():
        q = pooled(inner(**t_q).last_hidden_state, t_q["attention_mask"])
        c = pooled(inner(input_ids=tt_ids, attention_mask=tt_mask).last_hidden_state, tt_mask)
        s = q @ c.T
        pos = s.diag()
        masked = s.masked_fill(eye | (s > pos[:, None] + beta), -torch.inf).detach()
        idx = masked.topk(k, dim=1).indices
        logits = torch.cat([pos[:, None], s.gather(1, idx)], 1) / tau
        loss = torch.nn.functional.cross_entropy(logits, torch.zeros(rows, dtype=torch.long, device=device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    out["torch_first_loss"] = torch_step()
    out["torch_step"] = _median_time(torch_step)
    optimizer.state.clear()
    peft_model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.empty_cache()

    cfg = LoRAConfig(
        rank=16, alpha=64.0, dropout=0.0, targets=lm_targets("mistral", prefix="language_model.")
    )
    apply_lora(loaded.model, cfg, nnx.Rngs(0))
    trainable, total = param_counts(loaded.model)
    mesh = make_mesh(devices=jax.devices()[:1])
    stage = StageSection(optimizer=OptimizerConfig(learning_rate=2e-5))
    trainer = Trainer(
        loaded.model, Stage2Task(Stage2Config(tau=tau, beta=beta, k=k)), stage, total_steps=100, mesh=mesh
    )
    holder = {"state": trainer.init_state(seed=0)}
    local = {f"query_{k2}": v for k2, v in queries.items()}
    local.update(target_input_ids=t_ids, target_attention_mask=t_mask)
    batch = global_batch(local, mesh)

    def jax_step():
        holder["state"], metrics = trainer.step(holder["state"], batch)
        return float(metrics["loss"])

    tic = time.perf_counter()
    out["jax_first_loss"] = jax_step()
    out["jax_compile_and_first_step_s"] = time.perf_counter() - tic
    out["jax_step"] = _median_time(jax_step)
    out["jax_compiles"] = trainer._step_fn._cache_size()
    out["speedup"] = out["torch_step"]["median_s"] / out["jax_step"]["median_s"]
    vision_params = sum(x.size for x in jax.tree.leaves(nnx.state(loaded.model.vision_tower)))
    lm_tokens = out["query_tokens"] + out["target_tokens"]
    vision_tokens = (
        int(np.sum(queries["image_grids"].prod(1) + 1)) * (queries["pixel_values"].shape[-1] // 14) ** 2
    )
    flops = lm_flops_per_token(total - trainable - vision_params, trainable, gradcache=False) * lm_tokens
    flops += 2 * vision_params * vision_tokens
    out["model_tflops_per_step"] = flops / 1e12
    out["jax_tflops_per_s"] = flops / out["jax_step"]["median_s"] / 1e12
    out["torch_tflops_per_s"] = flops / out["torch_step"]["median_s"] / 1e12
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--tiny", action="store_true", help="tiny configs on CPU (a dry run of the same code)"
    )
    parser.add_argument("--models", default="phi-3.5-mini,mistral-7b,llava-1.6-7b")
    parser.add_argument("--no-encode", default="mistral-7b", help="models whose encode timing is skipped")
    parser.add_argument("--llava-parts", default="parity,features,encode,w2", help="LLaVA checks to run")
    parser.add_argument("--attention", default="cudnn", choices=["cudnn", "xla"])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    report = {
        "device": jax.devices()[0].device_kind,
        "torch_device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    for name in args.models.split(","):
        try:
            if name.startswith("llava"):
                report[name] = llava_check(args.tiny, device, args.attention, args.llava_parts)
            else:
                report[name] = check_model(
                    name, args.tiny, device, args.attention, name not in args.no_encode
                )
        except Exception:  # keep the other model's numbers if one fails
            report[name] = {"error": traceback.format_exc()[-3000:]}
        gc.collect()  # free this model's device memory before the next one
        if device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({name: report[name]}, indent=1), flush=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

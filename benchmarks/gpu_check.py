"""Full-size random-weight checks on one GPU: bf16 parity with transformers, and encode throughput.

    python benchmarks/gpu_check.py --out results.json          # on a GPU (H100/H200)
    python benchmarks/gpu_check.py --tiny --out /tmp/r.json    # the same code path, tiny, on CPU

For Mistral-7B and Phi-3.5-mini configs with random bf16 weights, it builds the transformers
model on the device, converts its state dict in memory with `convert.load_from_source`, and
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

from convert.safetensors_io import ArrayDict
from convert.to_jax import load_from_source
from unime_jax.models import pooling
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


def _to_numpy(t: torch.Tensor) -> np.ndarray:
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


def check_model(name: str, tiny: bool, device: str, attention: str) -> dict:
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
    state = {k: _to_numpy(v) for k, v in ref.state_dict().items()}
    loaded = load_from_source(
        ArrayDict(state), cfg.to_dict(), make_mesh(devices=jax.devices()[:1]), progress=False,
        dtype="float32" if tiny else "bfloat16", attention="xla" if tiny else attention,
    )  # fmt: skip
    del state
    result = {"convert_s": time.perf_counter() - tic, "params": sum(p.numel() for p in ref.parameters())}
    model = loaded.model

    @jax.jit
    def hidden_fn(ids, mask):
        return model(ids, attention_mask=mask)

    @jax.jit
    def encode_fn(ids, mask):
        return pooling.embed(model(ids, attention_mask=mask), mask)

    cases = {"short": (512 if not tiny else 24, [1.0, 0.8, 0.55, 0.25])}
    if name.startswith("phi"):  # past original_max_position_embeddings: longrope's long factors
        cases["long"] = (int(loaded.config.rope_scaling.original_max_position_embeddings * 1.125), [1.0, 0.9])
    for case, (seq, fractions) in cases.items():
        ids, mask = _batch(cfg.vocab_size, [max(2, int(seq * f)) for f in fractions], seq)
        with torch.no_grad():
            out = ref(input_ids=torch.tensor(ids, device=device), attention_mask=torch.tensor(mask, device=device), output_hidden_states=True)  # fmt: skip
        h_ref = out.hidden_states[-1].float().cpu().numpy()
        h_jax = np.asarray(hidden_fn(jnp.asarray(ids), jnp.asarray(mask)).astype(jnp.float32))
        real = mask.astype(bool)
        diff = h_jax[real] - h_ref[real]
        result[f"{case}_seq{seq}_rel_err"] = float(np.linalg.norm(diff) / np.linalg.norm(h_ref[real]))
        result[f"{case}_seq{seq}_max_abs_err"] = float(np.abs(diff).max())
        last = mask.sum(1) - 1
        e_ref, e_jax = h_ref[np.arange(len(last)), last], h_jax[np.arange(len(last)), last]
        cos = (e_ref * e_jax).sum(1) / np.linalg.norm(e_ref, axis=1) / np.linalg.norm(e_jax, axis=1)
        result[f"{case}_seq{seq}_min_pooled_cosine"] = float(cos.min())

    # Encode throughput (W4 for Phi-3.5-mini): 1024 sentences x 64 tokens, forward + pooling.
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
        return encode_fn(j_ids, j_mask).block_until_ready()

    tic = time.perf_counter()
    jax_encode()
    result["jax_encode_compile_s"] = time.perf_counter() - tic
    result["torch_encode"] = _median_time(torch_encode)
    result["jax_encode"] = _median_time(jax_encode)
    result["encode_sentences"] = n
    result["encode_speedup"] = result["torch_encode"]["median_s"] / result["jax_encode"]["median_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--tiny", action="store_true", help="tiny configs on CPU (a dry run of the same code)"
    )
    parser.add_argument("--models", default="mistral-7b,phi-3.5-mini")
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
            report[name] = check_model(name, args.tiny, device, args.attention)
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

"""Time LoRA dropout masks drawn with threefry and with rbg keys (what ``models.lora`` now uses).

One mask is one adapter input of a stage-2 GradCache chunk: 6,144 tokens at width 4,096 (Mistral-7B),
drawn 7 times per layer and pass. Median of ``--repeats`` jitted draws after a warm-up.

    PYTHONPATH=. python benchmarks/dropout_rng.py [--tokens 6144] [--width 4096]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax


def time_masks(impl: str, size: int, repeats: int) -> float:
    draw = jax.jit(lambda key: jax.random.bernoulli(key, 0.9, (size,)).sum())
    key = jax.random.key(0, impl=impl)
    draw(key).block_until_ready()
    times = []
    for i in range(repeats):
        tic = time.perf_counter()
        draw(jax.random.fold_in(key, i)).block_until_ready()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=6144)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    size = args.tokens * args.width
    results = {impl: time_masks(impl, size, args.repeats) for impl in ("threefry2x32", "rbg")}
    device = jax.devices()[0].device_kind
    for impl, seconds in results.items():
        print(f"{impl:13s} {seconds * 1e3:8.1f} ms for {size:,} mask bits on {device} (jax {jax.__version__})")
    return results


if __name__ == "__main__":
    main()

"""Test-wide JAX setup: 8 fake CPU devices and exact fp32 matmuls.

Both must be set before JAX initialises its backends, so they live here, at collection time.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# UniME.load turns on JAX's persistent compilation cache; tests must not write to the home directory.
os.environ.setdefault("UNIME_JAX_COMPILATION_CACHE", "0")
# W&B's offline runs keep their service logs, and mteb its (unused) result cache, out of ~/.cache.
os.environ.setdefault("WANDB_CACHE_DIR", os.path.join(tempfile.gettempdir(), "unime-jax-tests-wandb"))
os.environ.setdefault("MTEB_CACHE", os.path.join(tempfile.gettempdir(), "unime-jax-tests-mteb"))

import jax

jax.config.update("jax_default_matmul_precision", "float32")

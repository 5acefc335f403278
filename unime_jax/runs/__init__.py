"""Composition roots: what a training run is made of, above the engine.

- ``schema``: the run config (``python -m unime_jax.train --config``), its sections assembled;
- ``stages``: one stage from a backbone (adapters, pipeline, trainer, checkpoints, merge);
- ``train``: a whole run (stages in order, resume, export);
- ``demo``: what the CPU demo adds (its data, warm-up, evaluations and ablation).
"""

"""A tiny stage-2 training run used by the resume and multi-host tests (run as a subprocess).

Global batch k is a pure function of k; each process feeds its own rows of it through a grain
iterator whose state is checkpointed with the train state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--stop-after", type=int, help="exit (as if killed) after this many steps")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--coordinator-address")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--packed", action="store_true", help="feed the packed layout (data.packing)")
    parser.add_argument("--bad-data-on", type=int, help="this process's data fails its bad-sample limit at batch 2")
    args = parser.parse_args()

    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_default_matmul_precision", "float32")
    sys.path.insert(0, str(Path(__file__).parent))
    import grain
    from helpers.batches import stage2_batch

    from unime_jax.conversion import load_hf_model
    from unime_jax.data.errors import DataError
    from unime_jax.data.packing import PackSpec, pack_batch, pack_classes, packed_lengths
    from unime_jax.sharding import make_mesh
    from unime_jax.training import distributed, loop
    from unime_jax.training.checkpoints import Checkpoints
    from unime_jax.training.metrics import MetricsWriter
    from unime_jax.training.optimizer import OptimizerConfig
    from unime_jax.training.sections import StageSection
    from unime_jax.training.tasks import Stage2Config, Stage2Task
    from unime_jax.training.trainer import Trainer

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    rows, pid, nproc = 16, jax.process_index(), jax.process_count()

    def local_rows(k: int) -> dict:
        if pid == args.bad_data_on and k == 2:  # what the pipeline's DataIterator raises over the limit
            raise DataError(f"process {pid}: 3 of 4 samples were bad and skipped (test)")
        batch = stage2_batch(rows, seed=1000 + k)
        per = rows // nproc
        local = {key: value[pid * per : (pid + 1) * per] for key, value in batch.items()}
        if not args.packed:
            return local
        shards = jax.local_device_count()
        classes = pack_classes(packed_lengths(12, smallest=4), (), chunk_tokens=8, max_rows=2)
        return pack_batch(local, PackSpec(classes, shards, first_shard=pid * shards))

    iterator = iter(grain.MapDataset.range(10_000).map(local_rows).to_iter_dataset())
    mesh = make_mesh(data=-1)
    model = load_hf_model(args.hf_dir, mesh, progress=False).model
    stage = StageSection(
        grad_chunks=args.chunks, save_every=1, optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2)
    )
    trainer = Trainer(model, Stage2Task(Stage2Config(k=4)), stage, total_steps=args.steps, mesh=mesh)
    state = trainer.init_state(seed=0)
    identity = {"model": "tiny-mistral", "task": "stage2"}
    ckpts = Checkpoints(Path(args.workdir) / "checkpoints", identity, {"steps": args.steps}, keep=2)
    state, restored = ckpts.restore_latest(state, iterator)
    print(f"process {pid} restored step {restored}", flush=True)
    writer = MetricsWriter(Path(args.workdir))
    state, history = loop.run(trainer, state, iterator, writer, checkpoints=ckpts, stop_at=args.stop_after)
    ckpts.close()
    if jax.process_index() == 0:
        losses = [h["loss"] for h in history]
        (Path(args.workdir) / f"losses-{int(state.step)}.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main()

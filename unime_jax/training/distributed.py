"""Multi-host start-up through `jax.distributed`: explicit flags, or auto-detection on clusters."""

from __future__ import annotations

import os

import jax

# Environment variables that mean "this process is one of several launched by a cluster manager";
# jax.distributed.initialize() reads the details itself.
_CLUSTER_HINTS = (
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def _cluster_detected() -> bool:
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    others = any(os.environ.get(k) for k in _CLUSTER_HINTS[1:])
    return slurm_tasks > 1 or others


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Join the multi-process run; returns True when running with more than one process.

    With an address, the three flags must all be given (e.g. for CPU tests over gloo on
    127.0.0.1). Without one, SLURM, Open MPI and Cloud TPU environments are auto-detected.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator-address, --num-processes and --process-id must be given together")
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            # CPU collectives across processes need an implementation; gloo ships with jaxlib.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    elif _cluster_detected():
        jax.distributed.initialize()
    return jax.process_count() > 1

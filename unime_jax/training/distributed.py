"""Multi-host start-up through `jax.distributed` (explicit flags, or auto-detection on clusters),
and the collectives that keep the processes of a run deciding alike.

A check whose verdict can differ between processes (free host memory, the data each one read,
a file one of them cannot read) must be agreed on before anyone acts on it: a process that
raised alone would leave the others waiting forever in the next collective step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np

T = TypeVar("T")

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


def failing_processes(failed: bool) -> list[int]:
    """The indices of the processes that pass ``failed=True``: a collective, every process calls it."""
    if jax.process_count() == 1:
        return [0] if failed else []
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(failed))
    return [int(i) for i in np.flatnonzero(flags)]


def checked_on_every_process(check: Callable[[], T], error: type[Exception]) -> T:
    """``check()``'s result, when it passed on every process. Its ``error`` is raised where it
    failed and, naming those processes, on every other one (a collective)."""
    try:
        result, failure = check(), None
    except error as e:
        result, failure = None, e
    failed = failing_processes(failure is not None)
    if failure is not None:
        raise failure
    if failed:
        raise error(f"process(es) {', '.join(map(str, failed))} stopped the run; their output says why")
    return result  # type: ignore[return-value]


def host_arrays(tree: Any) -> Any:
    """Every array of ``tree`` whole, as numpy, on every process (a collective): what a process
    writing a file alone needs when the arrays are sharded over other hosts' devices."""
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)

"""How much host memory a pipeline's buffered batches take, checked against what the machine has.

A batch holds at most batch_size examples at their fixed shapes (length buckets only cut them;
the packed layout's buffers are sized for that worst case). The batches in flight at once:

- with grain workers, each worker holds ``worker_buffer_size`` finished batches, the
  ``prefetch_batches`` its reader threads compute ahead, and the one it is building;
- the training process holds the batch being sent to the devices and the one the step runs on
  (the loop reads batch k+1 while step k runs), plus, without workers, its reader threads'
  ``prefetch_batches``.

Stage 2's padded float32 batches of 1024 rows were 13.9 GB, so 8 workers with 2 buffered batches
could ask for some 220 GB: a start-up check turns that into an error with the numbers instead of
an out-of-memory kill hours later.
"""

from __future__ import annotations

import os

from unime_jax.data.config import LoaderSection
from unime_jax.data.errors import DataError

__all__ = ["available_bytes", "batches_in_flight", "check_host_memory"]

_GB = 1e9


def batches_in_flight(loader: LoaderSection) -> int:
    """The most batches of this process's pipeline held in host memory at once (module docstring)."""
    in_training_process = 2
    if loader.num_workers == 0:
        return in_training_process + loader.prefetch_batches
    per_worker = loader.worker_buffer_size + loader.prefetch_batches + 1
    return in_training_process + loader.num_workers * per_worker


def available_bytes() -> int | None:
    """Memory the machine can still give (Linux MemAvailable); None where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_host_memory(loader: LoaderSection, batch_bytes: int, available: int | None = None) -> str:
    """A one-line account of the pipeline's host memory for batches of ``batch_bytes``; DataError
    if it exceeds ``available`` (default: what the machine has now)."""
    count = batches_in_flight(loader)
    need = count * batch_bytes
    available = available_bytes() if available is None else available
    if loader.num_workers:
        held = (
            f"{loader.num_workers} workers x ({loader.worker_buffer_size} buffered + "
            f"{loader.prefetch_batches} prefetched + 1 in progress) + 2 in the training process"
        )
    else:
        held = f"{loader.prefetch_batches} prefetched + 2 in the training process"
    account = (
        f"host memory for batches: {count} in flight ({held}) x {batch_bytes / _GB:.2f} GB per batch "
        f"= {need / _GB:.1f} GB"
    )
    if available is None:
        return account + " (available memory unknown)"
    if need > available:
        raise DataError(
            f"{account}, but only {available / _GB:.1f} GB are available; lower data.loader.num_workers, "
            "data.loader.worker_buffer_size or data.loader.prefetch_batches (or the batch size)"
        )
    return f"{account} of {available / _GB:.1f} GB available"

"""A cheap fingerprint of a model directory's contents, recorded in ``run.json`` and every cache.

It says which model a run's results belong to by what the files hold, never by where they are or
when they were written: a copied checkpoint, or each host's own copy in a multi-host run,
fingerprints alike, and a rerun into the same ``--out`` continues.

Hashing every byte would read a 15 GB checkpoint once more before each run loads it, so a
file above ``WINDOWS`` x ``WINDOW`` bytes contributes its size and ``WINDOWS`` evenly spaced 1 MiB
windows (16 MiB of it): the first holds its header (safetensors' tensor names, dtypes, shapes and
offsets), the last its end. That tells apart the models one output directory meets: configs,
tokenizers and other small files are read whole; another architecture or export layout changes
the headers or the sizes; other weights of the same shapes (another checkpoint, more training,
even a LoRA merged into its base) differ in the attention and MLP matrices of every layer, most of
a checkpoint's bytes, so most windows land in them. An edit confined to a few small tensors that
fall between the windows is not seen: score such a model into a new ``--out``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["WINDOW", "WINDOWS", "model_fingerprint"]

WINDOW = 1 << 20  # bytes per window
WINDOWS = 16  # windows per large file; a file up to WINDOWS * WINDOW bytes is read whole


def _file_digest(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if size <= WINDOWS * WINDOW:
            digest.update(handle.read())
        else:
            step = (size - WINDOW) // (WINDOWS - 1)  # the first window at 0, the last ending at the end
            for window in range(WINDOWS):
                handle.seek(size - WINDOW if window == WINDOWS - 1 else window * step)
                digest.update(handle.read(WINDOW))
    return digest.hexdigest()


def model_fingerprint(directory: Path) -> str:
    """sha256 over the relative path, size and content digest of each file of ``directory``.

    Hidden files and folders are left out: ``huggingface-cli download --local-dir`` keeps download
    times in ``.cache/``, which differ between two downloads of the same model.
    """
    directory = Path(directory)
    files = sorted(
        p for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )  # fmt: skip
    listing = []
    for path in files:
        size = path.stat().st_size
        listing.append((path.relative_to(directory).as_posix(), size, _file_digest(path, size)))
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

"""The two ways data can be wrong: one bad sample (skip it) or a bad dataset (stop)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class DataError(Exception):
    """The dataset as a whole cannot be used: malformed file, mismatched store, too many bad samples."""

    exit_code = 1  # the command lines' status when it stops a run (unime_jax.cli_errors)


class BadSample(Exception):
    """One sample cannot be featurized; the pipeline skips it, counts it under `reason` and logs `where`.

    Args:
      reason: a short metric-friendly category, e.g. ``missing_image``, ``empty_text``.
      where: which file, row and column, so the record can be found and fixed.
    """

    def __init__(self, reason: str, where: str) -> None:
        super().__init__(f"{reason}: {where}")
        self.reason = reason
        self.where = where

    def __reduce__(self) -> tuple[type[BadSample], tuple[str, str]]:
        # Exceptions pickle through `args`; ours has two constructor arguments, not one message.
        return BadSample, (self.reason, self.where)


def read_json_object(path: Path, what: str, missing_hint: str) -> dict[str, Any]:
    """A manifest's JSON object, or a DataError naming the file: `what` it is, and how to make it if missing."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"no {what} at {path.parent} ({path.name} missing); {missing_hint}") from e
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {what} manifest {path}: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"{what} manifest {path} must hold a JSON object")
    return data

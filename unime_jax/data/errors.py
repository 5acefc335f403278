"""The two ways data can be wrong: one bad sample (skip it) or a bad dataset (stop)."""

from __future__ import annotations


class DataError(Exception):
    """The dataset as a whole cannot be used: malformed file, mismatched store, too many bad samples."""


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

"""How sure a small benchmark's numbers are: Wilson intervals for one accuracy, McNemar's exact test
for two models scored on the same rows (plain Python, no SciPy)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["mcnemar_p", "wilson_interval"]


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of ``correct / total`` (95% by default); (0, 1) for no rows."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value that models a and b, right or wrong on the same rows, are
    equally accurate: a binomial test on the rows where exactly one of them is right."""
    if len(a) != len(b):
        raise ValueError(f"the two models were scored on {len(a)} and {len(b)} rows")
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)

"""Token budgets: ``keep=int`` (tokens kept) or ``keep=float`` in (0, 1] (fraction kept)."""

from __future__ import annotations

import math
import numbers

Budget = int | float


def check_budget(keep: Budget, arg: str = "keep") -> Budget:
    """Validate a budget at config time; the token count it applies to is only known per input."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ValueError(f"{arg} must be an int (tokens kept, >= 1) or a float in (0, 1] (fraction kept); got {keep!r}")
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise ValueError(f"{arg}={keep} is out of range: an int budget counts tokens kept and must be >= 1")
        return int(keep)
    keep = float(keep)
    if not (0.0 < keep <= 1.0) or math.isnan(keep):
        raise ValueError(f"{arg}={keep} is out of range: a float budget is the fraction kept, in (0, 1]")
    return keep


def round_half_up(x: float) -> int:
    """The nearest integer, halves up (Python's ``round`` rounds them to even)."""
    return math.floor(x + 0.5)


def resolve_budget(keep: Budget, n: int, arg: str = "keep", what: str = "visual tokens") -> int:
    """Number of tokens to keep out of ``n``.

    A fraction rounds half up and keeps at least one token, so 0.1 of 576 keeps 58 (the paper's "10 %").
    An int larger than ``n`` is an error rather than a silent keep-all: the caller asked for something
    this input cannot give, and comparing methods at unequal budgets would be misleading.
    """
    if n <= 0:
        return 0
    if isinstance(keep, float):
        return max(1, min(n, int(keep * n + 0.5)))
    if keep > n:
        raise ValueError(
            f"{arg}={keep} is larger than the {n} {what} of this input; use {arg} <= {n} or a fraction in (0, 1]"
        )
    return keep

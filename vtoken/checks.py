"""Argument checks for configs and public functions: a bad value raises a ValueError that names the argument and
what is allowed. Every config dataclass validates its fields with these in ``__post_init__``."""

from __future__ import annotations


def check_int(value, arg: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{arg} must be an int; got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        rng = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{arg}={value} is out of range; allowed: {rng}")
    return value


def check_choice(value, arg: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{arg}={value!r} is not allowed; choose one of {', '.join(map(repr, choices))}")


def check_float(value, arg: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float in [low, high]; ``low_open`` / ``high_open`` exclude an end (``high=math.inf`` with
    ``high_open=True`` is "any finite value above low")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{arg} must be a number; got {value!r}")
    value = float(value)
    bad_low = value <= low if low_open else value < low
    bad_high = value >= high if high_open else value > high
    if bad_low or bad_high or value != value:
        allowed = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{arg}={value} is out of range; allowed: {allowed}")
    return value

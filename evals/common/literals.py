"""Command-line and model_args values arrive as strings; turn them into the Python values configs expect."""

from __future__ import annotations


def parse_literal(value: str):
    """``"true"``/``"false"`` -> bool, ``"none"`` -> None, then int, then float, else the string itself."""
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value

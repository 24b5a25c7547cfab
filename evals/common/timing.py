"""Timing for the benchmark commands: CUDA events on a GPU (read once, after the timed calls), wall time on a CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def elapsed_ms(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(milliseconds, result) of one call of ``fn``."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end), result
    t0 = time.perf_counter()
    result = fn()
    return (time.perf_counter() - t0) * 1e3, result


def median_ms(fn: Callable[[], object], reps: int, device: torch.device) -> tuple[float, object]:
    """Median milliseconds of ``reps`` calls after one untimed call (which also compiles Triton kernels), and the last
    result."""
    result = fn()
    times = []
    for _ in range(reps):
        ms, result = elapsed_ms(fn, device)
        times.append(ms)
    return statistics.median(times), result

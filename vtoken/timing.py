"""Timing that does not stall the device: on a GPU every stamp is a CUDA event recorded in the stream, and the times
are read (one wait, for the last event) only when someone asks; on a CPU, wall time. Inside a graph (traced by
torch.compile, or captured by CUDA) nothing is stamped: the work runs with the rest of the graph, so it has no time of
its own, and its times read NaN."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import torch

from vtoken.kernels.dispatch import inside_graph


class Stopwatch:
    """Stamps of a stretch of work: named marks (``laps`` gives the milliseconds since the previous mark) and timed
    blocks (``with stopwatch(device): ...``, summed in ``seconds``). ``device`` given: a first mark, "start"."""

    def __init__(self, device: torch.device | None = None, enabled: bool = True):
        self.device, self.enabled = device, enabled
        self.marks: list[tuple[str, object]] = []
        self.blocks: list[tuple[object, object]] = []
        self.read_seconds = 0.0
        self.traced = False  # a block ran inside a compiled graph
        if device is not None:
            self.mark("start")

    def stamp(self, device: torch.device | None):
        if device is not None and device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self, label: str) -> None:
        if not self.enabled:
            return
        if inside_graph():
            self.traced = True
            self.marks.append((label, None))
            return
        self.marks.append((label, self.stamp(self.device)))

    def laps(self) -> dict[str, float]:
        """Milliseconds per mark since the previous one (NaN where either mark was inside a graph)."""
        pairs = list(zip(self.marks, self.marks[1:]))
        return {label: math.nan if a is None or b is None else elapsed_ms(a, b) for (_, a), (label, b) in pairs}

    @contextlib.contextmanager
    def __call__(self, device: torch.device) -> Iterator[None]:
        if inside_graph():  # traced or captured, the block runs with the rest of the graph: no time of its own
            self.traced = True
            yield
            return
        start = self.stamp(device)
        yield
        self.blocks.append((start, self.stamp(device)))

    def take(self, other: Stopwatch) -> None:
        """Move ``other``'s timed blocks into this one (work timed elsewhere that belongs to this stretch)."""
        self.blocks += other.blocks
        other.blocks = []

    @property
    def seconds(self) -> float:
        """Seconds in the timed blocks so far; NaN once a block ran inside a compiled graph (not measurable)."""
        if self.traced:
            return math.nan
        if self.blocks:
            self.read_seconds += sum(elapsed_ms(a, b) for a, b in self.blocks) / 1000.0
            self.blocks = []
        return self.read_seconds


def elapsed_ms(start, end) -> float:
    """Milliseconds between two stamps (CUDA events: waits for ``end``)."""
    if isinstance(end, float):
        return (end - start) * 1e3
    end.synchronize()
    return start.elapsed_time(end)

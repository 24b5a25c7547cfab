"""Peak memory of a block: CUDA allocator statistics on a GPU, sampled resident set size on a CPU."""

from __future__ import annotations

import threading
import time

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """``with PeakMemory(device) as m: ...; m.peak_mb`` — extra memory at the peak of the block, in MiB.

    On CUDA this is ``max_memory_allocated`` above what was allocated on entry (exact). On CPU the resident set
    size is sampled every millisecond by a thread (approximate: allocator caching and the sampling interval both
    blur it), which is the best a portable script can do without instrumenting the allocator.
    """

    def __init__(self, device: torch.device | str, interval_s: float = 0.001):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_mb = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            self._base = self._peak = _rss_bytes()
        except OSError:
            self._base = None
            return self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._base is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.peak_mb = (self._peak - self._base) / 2**20

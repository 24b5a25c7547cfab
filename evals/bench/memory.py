"""Peak memory of a block: CUDA allocator statistics on a GPU, the sampled in-use heap on a CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
import time

import torch


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None


def heap_in_use() -> int | None:
    """Bytes malloc has handed out and not got back (small blocks + mmap'd large ones): live CPU tensors, unlike
    the resident set size, which keeps pages the allocator holds for reuse."""
    libc = _libc()
    if libc is None:
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def resident_set() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """``with PeakMemory(device) as m: ...; m.peak_mb`` — extra memory at the peak of the block, in MiB.

    On CUDA this is ``max_memory_allocated`` above what was allocated on entry (exact). On CPU a thread samples
    glibc's in-use heap every half millisecond (live allocations; approximate only in that a peak shorter than the
    interval can be missed); without glibc it falls back to the resident set size, which memory reuse blurs.
    """

    def __init__(self, device: torch.device | str, interval_s: float = 0.0005):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_mb = float("nan")
        self.source = "cuda allocator" if self.device.type == "cuda" else (
            "heap in use" if heap_in_use() is not None else "resident set")

    def _read(self) -> int:
        used = heap_in_use()
        return used if used is not None else resident_set()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._peak = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._read())
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._read())
        self.peak_mb = (self._peak - self._base) / 2**20

"""Name the machine a measurement ran on, and how busy it was, so every printed figure says where it comes from.

Timings on a shared CPU are only as good as the cores they get: at a load of 4 on 2 cores, ``vtoken bench`` measured
ToDRE 1.16x faster than dense with 2 torch threads and 3.96x with 1. So the speed commands read the load first, use
as many threads as there are free cores (unless ``--threads`` says otherwise), print both in their header and warn
when the threads still outnumber the free cores.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from dataclasses import dataclass

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_load() -> tuple[float, int, int]:
    """(1-minute load average, cores this process may run on, cores of the machine). The load is the machine's,
    spread over all of its cores; it is NaN where the OS keeps none."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    machine = os.cpu_count() or 1
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else machine
    return load, available, machine


def free_cores(load: float, available: int, machine: int) -> int:
    """Cores the load leaves idle, to the nearest core, of those this process may use (all when the load is NaN)."""
    if math.isnan(load):
        return available
    return max(0, min(available, math.floor(machine - load + 0.5)))


@dataclass(frozen=True)
class Threads:
    """The torch CPU threads a run uses, and the load they were chosen against."""

    load: float  # 1-minute load average when the run started (NaN: unknown)
    cores: int  # cores available to this process
    machine_cores: int  # cores the load is spread over
    threads: int
    chosen: bool  # True: picked from the load; False: given with --threads

    @property
    def free(self) -> int:
        return free_cores(self.load, self.cores, self.machine_cores)

    @property
    def warning(self) -> str | None:
        if self.threads <= self.free:
            return None
        return (f"warning: the 1-minute load average is {self.load:.2f} on {self.machine_cores} cores, so "
                f"{self.free} of this process's {self.cores} {'is' if self.free == 1 else 'are'} free, and this run "
                f"uses {self.threads} torch thread{'s' if self.threads > 1 else ''}: the threads wait for other work, "
                "so timings and speed-ups are unreliable. Rerun on a quieter machine.")

    def line(self) -> str:
        return load_line(self.as_dict())

    def as_dict(self) -> dict:
        return {"load_1min": None if math.isnan(self.load) else self.load, "cores_available": self.cores,
                "machine_cores": self.machine_cores, "free_cores": self.free, "torch_threads": self.threads,
                "threads_chosen_from_load": self.chosen, "load_warning": self.warning}


def load_line(info: dict) -> str:
    """The header line of a run from its ``Threads.as_dict()`` fields (also found in a report's machine dict)."""
    load = "unknown" if info["load_1min"] is None else f"{info['load_1min']:.2f}"
    threads = info["torch_threads"]
    how = "chosen from the load; --threads to override" if info["threads_chosen_from_load"] else "--threads"
    return (f"cpu load {load} (1-minute average) on {info['machine_cores']} cores, {info['free_cores']} of the "
            f"{info['cores_available']} available to this process free; {threads} torch "
            f"thread{'s' if threads > 1 else ''} ({how})")


def plan_threads(requested: int | None, load: float, cores: int, machine_cores: int | None = None) -> Threads:
    """``requested`` threads, or else the free cores (at least 1): more would only queue behind the load."""
    machine_cores = cores if machine_cores is None else machine_cores
    threads = requested if requested is not None else max(1, free_cores(load, cores, machine_cores))
    return Threads(load, cores, machine_cores, threads, chosen=requested is None)


def set_threads(requested: int | None) -> Threads:
    """Set torch's CPU threads for this run from ``--threads`` or the current load; warn on stderr if they
    outnumber the free cores."""
    plan = plan_threads(requested, *cpu_load())
    torch.set_num_threads(plan.threads)
    if plan.warning:
        print(plan.warning, file=sys.stderr)
    return plan


def describe_machine(device: torch.device | str = "cpu", threads: Threads | None = None) -> dict:
    """What a measurement ran on; with ``threads``, also the load and the thread choice of this run."""
    device = torch.device(device)
    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if threads is not None:
        info.update(threads.as_dict())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def machine_line(info: dict) -> str:
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads)"
    return f"machine: {where}; torch {info['torch']}, device {info['device']}"

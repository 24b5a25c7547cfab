"""One rule for every op: Triton for CUDA tensors, the PyTorch reference otherwise, or a forced backend.

``backend="triton"`` on CPU tensors runs Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the environment
before the kernels are first imported; that is how the tests check the kernels without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
_LAUNCH_WATCHERS: list[Callable[[str], contextlib.AbstractContextManager]] = []
_COUNTED_AS_GRAPH: list[bool] = []  # one entry per open ``counted_as_graph`` block


def inside_graph() -> bool:
    """Whether the running code may not read the device: torch.compile traces it, a CUDA graph captures it, or
    ``vtoken overhead --graphed`` counts it as a graph's replay. A read there would split the graph (or fail the
    capture), and a replay runs the shapes it was captured with."""
    if torch.compiler.is_compiling() or _COUNTED_AS_GRAPH:
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def counted_as_graph() -> Iterator[None]:
    """Run the block as a CUDA graph's replay would have recorded it (:func:`inside_graph` holds inside), so a CPU
    can count what a graphed model does."""
    _COUNTED_AS_GRAPH.append(True)
    try:
        yield
    finally:
        _COUNTED_AS_GRAPH.pop()


@contextlib.contextmanager
def launching(kernel: str) -> Iterator[None]:
    """Every Triton wrapper launches its kernels inside this, so a profiler can see each launch as one op, which no
    aten dispatch shows, and ignore what Triton's interpreter does on the host inside it (``vtoken overhead``)."""
    with contextlib.ExitStack() as stack:
        for watcher in _LAUNCH_WATCHERS:
            stack.enter_context(watcher(kernel))
        yield


@contextlib.contextmanager
def watching_launches(watcher: Callable[[str], contextlib.AbstractContextManager]) -> Iterator[None]:
    """Enter ``watcher(kernel name)`` around every Triton launch inside the block."""
    _LAUNCH_WATCHERS.append(watcher)
    try:
        yield
    finally:
        _LAUNCH_WATCHERS.remove(watcher)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # e.g. macOS / Windows wheels of torch come without Triton
        return False
    return True


def use_triton(x: torch.Tensor, backend: str, eager_only: bool = False) -> bool:
    """Whether a kernel runs in Triton. ``eager_only``: with ``backend="auto"``, a kernel whose PyTorch reference
    is a few aten ops takes the reference inside a compiled graph, where CUDA graphs replay those ops without the
    host's launches (what the Triton kernel saves) and Dynamo has no Triton launch to trace."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; choose one of {', '.join(map(repr, BACKENDS))}")
    if backend == "torch":
        return False
    if backend == "auto":
        return x.is_cuda and not (eager_only and torch.compiler.is_compiling()) and triton_available()
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which does not import here")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors runs the Triton interpreter: set TRITON_INTERPRET=1 before importing "
            "vtoken's kernels, or use backend='auto' / 'torch'"
        )
    return True

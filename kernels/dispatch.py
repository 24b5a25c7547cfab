"""One rule for every op: Triton for CUDA tensors, the PyTorch reference otherwise, or a forced backend.

``backend="triton"`` on CPU tensors runs Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the environment
before the kernels are first imported; that is how the tests check the kernels without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # e.g. macOS / Windows wheels of torch come without Triton
        return False
    return True


def use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; choose one of {', '.join(map(repr, BACKENDS))}")
    if backend == "torch":
        return False
    if backend == "auto":
        return x.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which does not import here")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors runs the Triton interpreter: set TRITON_INTERPRET=1 before importing "
            "vtoken's kernels, or use backend='auto' / 'torch'"
        )
    return True

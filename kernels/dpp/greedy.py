"""Greedy MAP of a determinantal point process (CDPruner) as one persistent Triton program per image.

In PyTorch each of the k steps is a handful of launches (about 20 aten ops per kept token); here one program per
image walks every step with the residual gains in registers, reading one kernel row and the Cholesky rows so far
(kept in a scratch buffer) per step. Reference: ``naive.dpp_greedy_map``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtoken.kernels.dispatch import launching


@triton.jit
def _dpp_kernel(kernel_ptr, rows_ptr, out_ptr, n, k, eps, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < n
    base = kernel_ptr + b * n * n
    rows = rows_ptr + b * k * n
    gains = tl.load(base + offs * (n + 1), mask=inside, other=float("-inf")).to(tl.float32)  # the diagonal
    for i in range(k):
        j = tl.argmax(gains, axis=0).to(tl.int64)  # the first maximum, as torch's argmax
        gain = tl.max(gains, axis=0)
        tl.store(out_ptr + b * k + i, j)
        update = tl.load(base + j * n + offs, mask=inside, other=0.0).to(tl.float32)
        for t in range(i):
            c = tl.load(rows + t * n + j)
            update -= c * tl.load(rows + t * n + offs, mask=inside, other=0.0)
        scale = tl.where(gain > eps, 1.0 / tl.sqrt(tl.maximum(gain, eps)), 0.0)
        update = update * scale
        tl.store(rows + i * n + offs, update, mask=inside)
        tl.debug_barrier()  # the next step reads this row back, in other threads' lanes
        gains = tl.where(offs == j, float("-inf"), gains - update * update)


def dpp_greedy_map_triton(kernel: torch.Tensor, k: int, eps: float = 1e-10) -> torch.Tensor:
    B, n, _ = kernel.shape
    kernel = kernel.float().contiguous()
    rows = torch.empty(B, k, n, dtype=torch.float32, device=kernel.device)
    out = torch.empty(B, k, dtype=torch.int64, device=kernel.device)
    block = triton.next_power_of_2(n)
    with launching("dpp greedy map"):
        _dpp_kernel[(B,)](kernel, rows, out, n, k, eps, BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return out

"""Greedy diversity selection as one persistent Triton program per image.

In PyTorch the k sequential steps cost a handful of launches each, so on a GPU selection is latency-bound (k = 288
steps ~ 2,000 launches). Here the similarity matrix is computed once by one matmul and a single program per image
walks all k steps with its running scores in registers, reading one matrix row per step.
Reference: ``naive.greedy_from_gram``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtoken.kernels.dispatch import launching


@triton.jit
def _greedy_kernel(gram_ptr, pivot_ptr, out_ptr, n, k, MAXMIN: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < n
    base = gram_ptr + b * n * n
    cur = tl.load(pivot_ptr + b).to(tl.int64)
    taken = offs >= n  # padding lanes count as taken, so they are never picked
    if MAXMIN:
        acc = tl.full((BLOCK,), float("inf"), tl.float32)
    else:
        acc = tl.zeros((BLOCK,), tl.float32)
    for step in range(k):
        tl.store(out_ptr + b * k + step, cur)
        taken = taken | (offs == cur)
        row = tl.load(base + cur * n + offs, mask=inside, other=0.0).to(tl.float32)
        if MAXMIN:
            acc = tl.minimum(acc, 1.0 - row)
            cur = tl.argmax(tl.where(taken, float("-inf"), acc), axis=0).to(tl.int64)
        else:
            acc = acc + row
            cur = tl.argmin(tl.where(taken, float("inf"), acc), axis=0).to(tl.int64)


def greedy_from_gram_triton(gram: torch.Tensor, k: int, pivot: torch.Tensor, maxmin: bool) -> torch.Tensor:
    B, n, _ = gram.shape
    k = min(k, n)
    gram = gram.contiguous()
    out = torch.empty(B, k, dtype=torch.int64, device=gram.device)
    block = triton.next_power_of_2(n)
    with launching("greedy diversity"):
        _greedy_kernel[(B,)](gram, pivot.to(gram.device, torch.int64).contiguous(), out, n, k, MAXMIN=maxmin,
                             BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return out

"""Triton k-means kernels for SVG2, batched over heads: nearest-centroid assignment, and a whole Lloyd step
(distances, argmin and the new centroids' sums) in one pass over the tokens.

References: ``naive.kmeans_assign_reference`` and ``naive.kmeans_step_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtoken.kernels.dispatch import launching


@triton.jit
def _assign_kernel(
    x_ptr, c_ptr, labels_ptr, acc_ptr,
    N, K, D,
    ACCUMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: BLOCK_N tokens of one head against all K centroids, tile by tile, keeping a running argmin of
    ``||c||^2 - 2 x.c`` so the N x K distance matrix never exists. ``ACCUMULATE``: then add each token to its
    cluster's fp32 sum and count with atomics, so a whole Lloyd step is one pass over ``x``."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    x = tl.load(x_ptr + bh * N * D + offs_n[:, None] * D + offs_d[None, :],
                mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        c = tl.load(c_ptr + bh * K * D + offs_k[:, None] * D + offs_d[None, :],
                    mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        c_sq = tl.sum(c * c, axis=1)
        dist = c_sq[None, :] - 2.0 * tl.dot(x, tl.trans(c))
        dist = tl.where(mask_k[None, :], dist, float("inf"))
        tile_best = tl.min(dist, axis=1)
        tile_idx = tl.argmin(dist, axis=1).to(tl.int32) + k0
        better = tile_best < best  # strict: ties keep the lower centroid index, like torch.argmin
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)
    tl.store(labels_ptr + bh * N + offs_n, best_idx.to(tl.int64), mask=mask_n)
    if ACCUMULATE:
        rows = (bh * K + best_idx.to(tl.int64)) * (D + 1)  # a cluster's row: its D sums, then its count
        tl.atomic_add(acc_ptr + rows[:, None] + offs_d[None, :], x, mask=mask_n[:, None] & mask_d[None, :])
        tl.atomic_add(acc_ptr + rows + D, tl.full((BLOCK_N,), 1.0, tl.float32), mask=mask_n)


@triton.jit
def _means_kernel(acc_ptr, old_ptr, out_ptr, sizes_ptr, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """BLOCK_K clusters of one head: the mean of each non-empty one, the old centroid of each empty one, and its
    size."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    bh = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_k = offs_k < K
    mask = mask_k[:, None] & (offs_d < D)[None, :]
    rows = (bh * K + offs_k) * (D + 1)
    sums = tl.load(acc_ptr + rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
    count = tl.load(acc_ptr + rows + D, mask=mask_k, other=0.0)
    old = tl.load(old_ptr + (bh * K + offs_k)[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    new = tl.where(count[:, None] > 0, sums / tl.maximum(count, 1.0)[:, None], old)
    tl.store(out_ptr + (bh * K + offs_k)[:, None] * D + offs_d[None, :], new, mask=mask)
    tl.store(sizes_ptr + bh * K + offs_k, count.to(tl.int64), mask=mask_k)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def kmeans_assign_triton(x: torch.Tensor, centroids: torch.Tensor, block_n: int = 64, block_k: int = 64):
    """Triton version of ``kmeans_assign_reference``: ``(BH, N, D), (BH, K, D) -> (BH, N)`` int64."""
    x, centroids = x.contiguous(), centroids.contiguous()
    bh, n, d = x.shape
    k = centroids.shape[1]
    labels = torch.empty(bh, n, dtype=torch.int64, device=x.device)
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    grid = (triton.cdiv(n, block_n), bh)
    with launching("k-means assign"):
        _assign_kernel[grid](x, centroids, labels, labels, n, k, d,  # no sums: the labels stand in for them
                             ACCUMULATE=False, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=_block_d(d))
    return labels


def kmeans_step_triton(x: torch.Tensor, centroids: torch.Tensor, block_n: int = 64, block_k: int = 64):
    """Triton version of ``kmeans_step_reference``: ``(BH, N, D), (BH, K, D) -> (labels (BH, N) int64, fp32
    centroids (BH, K, D), sizes (BH, K) int64)``, the new centroids the means of the new labels (empty clusters keep
    theirs). Two launches: the step, then the means.

    The sums are accumulated with atomics, so their last bits may differ from run to run (the order of additions is
    not fixed); the labels of one step do not depend on it."""
    x, centroids = x.contiguous(), centroids.contiguous()
    bh, n, d = x.shape
    k = centroids.shape[1]
    labels = torch.empty(bh, n, dtype=torch.int64, device=x.device)
    acc = torch.zeros(bh, k, d + 1, dtype=torch.float32, device=x.device)
    out = torch.empty(bh, k, d, dtype=torch.float32, device=x.device)
    sizes = torch.empty(bh, k, dtype=torch.int64, device=x.device)
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    with launching("k-means step"):
        _assign_kernel[(triton.cdiv(n, block_n), bh)](x, centroids, labels, acc, n, k, d, ACCUMULATE=True,
                                                      BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=_block_d(d))
        _means_kernel[(triton.cdiv(k, block_k), bh)](acc, centroids, out, sizes, k, d,
                                                     BLOCK_K=block_k, BLOCK_D=_block_d(d))
    return labels, out, sizes

"""Triton k-means kernels for SVG2, batched over heads: fused nearest-centroid assignment and a deterministic
centroid update over tokens sorted by label.

References: ``naive.kmeans_assign_reference`` and ``naive.kmeans_update_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtoken.kernels.dispatch import launching


@triton.jit
def _assign_kernel(
    x_ptr, c_ptr, labels_ptr,
    N, K, D,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: BLOCK_N tokens of one head against all K centroids, tile by tile, keeping a running argmin of
    ``||c||^2 - 2 x.c`` so the N x K distance matrix never exists."""
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


@triton.jit
def _update_kernel(
    x_ptr, order_ptr, offsets_ptr, old_ptr, out_ptr,
    N, K, D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: one cluster of one head. Its tokens are ``order[offsets[c] : offsets[c + 1]]`` (tokens sorted by
    label), summed in fp32 in a fixed order, so the result is bit-reproducible (no atomics)."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(offsets_ptr + bh * (K + 1) + c)
    end = tl.load(offsets_ptr + bh * (K + 1) + c + 1)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for s in range(start, end, BLOCK_N):
        offs = s + tl.arange(0, BLOCK_N)
        mask = offs < end
        tok = tl.load(order_ptr + bh * N + offs, mask=mask, other=0)
        rows = tl.load(x_ptr + bh * N * D + tok[:, None] * D + offs_d[None, :],
                       mask=mask[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(rows, axis=0)
    count = (end - start).to(tl.float32)
    old = tl.load(old_ptr + bh * K * D + c * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    new = tl.where(count > 0, acc / tl.maximum(count, 1.0), old)
    tl.store(out_ptr + bh * K * D + c * D + offs_d, new.to(out_ptr.dtype.element_ty), mask=mask_d)


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
        _assign_kernel[grid](x, centroids, labels, n, k, d, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=_block_d(d))
    return labels


def kmeans_update_triton(
    x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, centroids: torch.Tensor, block_n: int = 64
) -> torch.Tensor:
    """Triton centroid update from tokens sorted by label (``order``) and cluster offsets ``(BH, K + 1)``.

    Returns fp32 centroids ``(BH, K, D)``; empty clusters keep ``centroids``.
    """
    x = x.contiguous()
    bh, n, d = x.shape
    k = centroids.shape[1]
    out = torch.empty(bh, k, d, dtype=torch.float32, device=x.device)
    with launching("k-means update"):
        _update_kernel[(k, bh)](
            x, order.contiguous(), offsets.contiguous(), centroids.contiguous(), out, n, k, d,
            BLOCK_N=block_n, BLOCK_D=_block_d(d),
        )
    return out

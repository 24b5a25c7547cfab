"""Triton variable-block sparse attention over the SVG2 permuted layout (FlashAttention-style online softmax).

Query cluster ``i`` of head ``bh`` owns rows ``q_offsets[bh, i] : q_offsets[bh, i + 1]`` of the permuted queries and
attends to the key rows of a short list of ranges (runs of kept key clusters, contiguous after the key permutation).
Clusters have any size, so the work is split into tiles of ``BLOCK_M`` query rows *within* a cluster: a tile table
built on the device (no host sync) maps each program to ``(cluster, first row)``; surplus programs do nothing.
Reference: ``naive.varblock_attention_reference``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from vtoken.kernels.dispatch import launching


@triton.jit
def _varblock_attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    tile_cluster_ptr, tile_row_ptr, q_offsets_ptr,
    range_start_ptr, range_end_ptr, num_ranges_ptr,
    Nq, Nk, D, C, R, T, qk_scale_log2,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    cluster = tl.load(tile_cluster_ptr + bh * T + tile)
    valid = cluster >= 0
    cluster = tl.maximum(cluster, 0)
    row0 = tl.load(tile_row_ptr + bh * T + tile)
    row_end = tl.where(valid, tl.load(q_offsets_ptr + bh * (C + 1) + cluster + 1), row0)
    n_ranges = tl.where(valid, tl.load(num_ranges_ptr + bh * C + cluster), 0)

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < row_end
    mask_d = offs_d < D
    q = tl.load(q_ptr + bh * Nq * D + offs_m[:, None] * D + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:  # fp32 inputs, or the CPU interpreter (whose bf16 arithmetic is wrong)
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    ranges = range_start_ptr + (bh * C + cluster) * R
    for r in range(0, n_ranges):
        start = tl.load(ranges + r)
        end = tl.load(range_end_ptr + (bh * C + cluster) * R + r)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            kv_mask = mask_n[:, None] & mask_d[None, :]
            kv_offs = bh * Nk * D + offs_n[:, None] * D + offs_d[None, :]
            k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
            if UPCAST:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(mask_n[None, :], s * qk_scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every chunk holds >= 1 real key
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if UPCAST:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + bh * Nq * D + offs_m[:, None] * D + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


def tile_table(q_offsets: torch.Tensor, n_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(tile_cluster, tile_row, T)``, tables ``(BH, T)`` int32: tile t of a head covers ``block_m`` rows of one query
    cluster starting at ``tile_row``.

    ``T = ceil(n_rows / block_m) + C`` bounds the tile count of any head, so the grid is known without reading
    cluster sizes back to the host; tiles past a head's last one get cluster -1 (their programs do nothing).
    """
    bh, c = q_offsets.shape[0], q_offsets.shape[1] - 1
    offsets = q_offsets.long()
    tiles = (offsets[:, 1:] - offsets[:, :-1] + block_m - 1) // block_m  # (BH, C)
    ends = tiles.cumsum(-1).contiguous()
    t_max = triton.cdiv(n_rows, block_m) + c
    t = torch.arange(t_max, device=q_offsets.device).expand(bh, t_max).contiguous()
    cluster = torch.searchsorted(ends, t, right=True)  # first cluster whose tiles end after t (skips empty ones)
    valid = cluster < c
    safe = cluster.clamp(max=c - 1)
    first_tile = ends.gather(1, safe) - tiles.gather(1, safe)
    row = offsets.gather(1, safe) + (t - first_tile) * block_m
    tile_cluster = torch.where(valid, cluster, -1).to(torch.int32)
    tile_row = torch.where(valid, row, 0).to(torch.int32)
    return tile_cluster, tile_row, t_max


class Tiling(NamedTuple):
    """One launch configuration of the kernel: its tile shape and Triton's ``num_warps`` / ``num_stages``."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def candidate_tilings(dtype: torch.dtype) -> list[Tiling]:
    """What the tuner tries on a GPU: 16-bit tiles up to 128 x 128; fp32 ones stay small enough for the shared memory
    of an A100 or an RTX card."""
    sizes = [(32, 32), (64, 32), (32, 64)] if dtype == torch.float32 else [
        (64, 32), (64, 64), (64, 128), (128, 32), (128, 64), (128, 128)]
    return [Tiling(m, n, w, s) for m, n in sizes for w in (4, 8) for s in (2, 3)]


_TUNED: dict[tuple, Tiling] = {}


def tuned_tiling(key: tuple, candidates: list[Tiling], measure: Callable[[Tiling], float]) -> Tiling:
    """The fastest of ``candidates`` by ``measure`` (ms), measured once per ``key`` (the shape and dtype of a call)
    and remembered. A tiling the GPU cannot run (too much shared memory) is skipped."""
    if key not in _TUNED:
        timings = {}
        for tiling in candidates:
            try:
                timings[tiling] = measure(tiling)
            except triton.runtime.errors.OutOfResources:
                continue
        if not timings:
            raise RuntimeError(f"variable-block attention: no tiling of {candidates} runs on this GPU")
        _TUNED[key] = min(timings, key=timings.get)
    return _TUNED[key]


def varblock_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    range_start: torch.Tensor,
    range_end: torch.Tensor,
    num_ranges: torch.Tensor,
    scale: float,
    tiling: Tiling | None = None,
) -> torch.Tensor:
    """Triton version of ``varblock_attention_reference`` (same arguments, same result).

    ``tiling`` None: on a GPU, the fastest of :func:`candidate_tilings` for this shape, timed on its first call (the
    tile table depends on ``block_m``, so the tuner times whole calls rather than Triton's autotuner timing the
    kernel); under the interpreter 64 x 64.
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bh, nq, d = q.shape
    c, r = range_start.shape[1], range_start.shape[2]
    if bh == 0 or nq == 0 or c == 0:
        return torch.zeros_like(q)  # rows outside every cluster stay zero, as in the reference
    args = (q, k, v, q_offsets.to(torch.int32).contiguous(), range_start.to(torch.int32).contiguous(),
            range_end.to(torch.int32).contiguous(), num_ranges.to(torch.int32).contiguous(), scale)
    if tiling is None and q.is_cuda:
        from triton.testing import do_bench

        key = (bh, nq, k.shape[1], d, c, r, q.dtype, q.device.index)
        tiling = tuned_tiling(key, candidate_tilings(q.dtype), lambda t: do_bench(lambda: launch(*args, t)))
    return launch(*args, tiling or Tiling(64, 64))


def launch(q, k, v, q_offsets, range_start, range_end, num_ranges, scale: float, tiling: Tiling) -> torch.Tensor:
    bh, nq, d = q.shape
    c, r = range_start.shape[1], range_start.shape[2]
    out = torch.zeros_like(q)
    tile_cluster, tile_row, t_max = tile_table(q_offsets, nq, tiling.block_m)
    upcast = q.dtype == torch.float32 or not q.is_cuda
    with launching("variable-block attention"):
        _varblock_attn_kernel[(t_max, bh)](
            q, k, v, out, tile_cluster, tile_row, q_offsets, range_start, range_end, num_ranges,
            nq, k.shape[1], d, c, r, t_max, scale * math.log2(math.e),
            UPCAST=upcast, BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
            num_warps=tiling.num_warps, num_stages=tiling.num_stages,
        )
    return out

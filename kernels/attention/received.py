"""Attention-row scoring in two Triton launches, never holding a probability tensor.

1. ``_row_stats_kernel``, one program per (block of query rows, sample x query head): a pass over the keys with the
   online-softmax recurrence gives every row's max score and 1 / normaliser, (B, Hq, R) fp32 each.
2. ``_received_kernel``, one program per (block of keys, sample, KV head): recomputes the scores of its keys against
   every query row of the heads that share the KV head (GQA), turns them into probabilities with the row statistics
   and reduces over rows (weighted) and heads in registers; the KV-head partial sums (Hk, B, K) are added at the end.
   No atomics, so the result does not depend on scheduling.

Scores use ``exp2`` with the scale folded into ``log2(e)``. Inputs in fp16 / bf16 multiply on tensor cores with fp32
accumulation; fp32 inputs (and every input in the CPU interpreter, whose bf16 arithmetic is wrong) are upcast and
multiplied in IEEE fp32. Reference: ``naive.attention_received``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vtoken.kernels.dispatch import launching


@triton.jit
def _scores(q, k, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    return tl.dot(q, tl.trans(k))


@triton.jit
def _allowed(offs_r, offs_n, in_r, in_n, b, R, K, rows_ptr, valid_ptr, dense_ptr,
             HAS_ROWS: tl.constexpr, HAS_VALID: tl.constexpr, HAS_DENSE: tl.constexpr):
    ok = in_r[:, None] & in_n[None, :]
    if HAS_ROWS:
        at = tl.load(rows_ptr + b * R + offs_r, mask=in_r, other=-1)
        ok = ok & (offs_n[None, :] <= at[:, None])
    if HAS_VALID:
        valid = tl.load(valid_ptr + b * K + offs_n, mask=in_n, other=0)
        ok = ok & (valid[None, :] != 0)
    if HAS_DENSE:
        dense = tl.load(dense_ptr + b * R * K + offs_r[:, None] * K + offs_n[None, :],
                        mask=in_r[:, None] & in_n[None, :], other=0)
        ok = ok & (dense != 0)
    return ok


@triton.jit
def _row_stats_kernel(
    q_ptr, k_ptr, rows_ptr, valid_ptr, dense_ptr, max_ptr, inv_ptr,
    R, K, D, Hq, G, qk_scale,
    sq_b, sq_h, sq_r, sk_b, sk_h, sk_k,
    HAS_ROWS: tl.constexpr, HAS_VALID: tl.constexpr, HAS_DENSE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rblock = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    offs_r = rblock * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    in_r, in_d = offs_r < R, offs_d < D
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_r[:, None] * sq_r + offs_d[None, :],
                mask=in_r[:, None] & in_d[None, :], other=0.0)
    k_head = k_ptr + b * sk_b + (h // G) * sk_h
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    for n0 in range(0, K, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_n = offs_n < K
        k = tl.load(k_head + offs_n[:, None] * sk_k + offs_d[None, :], mask=in_n[:, None] & in_d[None, :], other=0.0)
        ok = _allowed(offs_r, offs_n, in_r, in_n, b, R, K, rows_ptr, valid_ptr, dense_ptr,
                      HAS_ROWS, HAS_VALID, HAS_DENSE)
        s = tl.where(ok, _scores(q, k, UPCAST) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no allowed key yet: keep exp2 finite
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    seen = l_i > 0
    out = bh * R + offs_r
    tl.store(max_ptr + out, tl.where(seen, m_i, 0.0), mask=in_r)
    tl.store(inv_ptr + out, tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0), mask=in_r)


@triton.jit
def _received_kernel(
    q_ptr, k_ptr, w_ptr, rows_ptr, valid_ptr, dense_ptr, max_ptr, inv_ptr, part_ptr,
    B, R, K, D, Hq, G, qk_scale, head_share,
    sq_b, sq_h, sq_r, sk_b, sk_h, sk_k,
    HAS_ROWS: tl.constexpr, HAS_VALID: tl.constexpr, HAS_DENSE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    nblock = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kv = tl.program_id(2)
    offs_n = nblock * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_n, in_d = offs_n < K, offs_d < D
    k = tl.load(k_ptr + b * sk_b + kv * sk_h + offs_n[:, None] * sk_k + offs_d[None, :],
                mask=in_n[:, None] & in_d[None, :], other=0.0)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for g in range(0, G):
        h = kv * G + g
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            in_r = offs_r < R
            q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_r[:, None] * sq_r + offs_d[None, :],
                        mask=in_r[:, None] & in_d[None, :], other=0.0)
            ok = _allowed(offs_r, offs_n, in_r, in_n, b, R, K, rows_ptr, valid_ptr, dense_ptr,
                          HAS_ROWS, HAS_VALID, HAS_DENSE)
            stats = (b * Hq + h) * R + offs_r
            m = tl.load(max_ptr + stats, mask=in_r, other=0.0)
            coef = tl.load(inv_ptr + stats, mask=in_r, other=0.0) * tl.load(w_ptr + b * R + offs_r, mask=in_r,
                                                                            other=0.0)
            s = _scores(q, k, UPCAST) * qk_scale
            p = tl.where(ok, tl.exp2(s - m[:, None]), 0.0)
            acc += tl.sum(p * coef[:, None], axis=0)
    tl.store(part_ptr + (kv * B + b) * K + offs_n, acc * head_share, mask=in_n)


def block_sizes(R: int, K: int, D: int, dtype: torch.dtype, cuda: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_N, BLOCK_D): every dot dimension >= 16 (the GPU compiler's minimum); fp32 tiles on a GPU half
    as large so they fit the 99 KiB of shared memory of the smallest cards; in the CPU interpreter, which pays per
    program and per op, few large blocks."""
    block_d = max(16, triton.next_power_of_2(D))
    if not cuda:
        return max(16, min(128, triton.next_power_of_2(R))), max(16, min(256, triton.next_power_of_2(K))), block_d
    wide = 32 if dtype == torch.float32 else 64
    return (16 if R <= 16 else wide), wide, block_d


def attention_received_triton(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, scale: float,
                              causal_rows: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
                              allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of ``naive.attention_received`` (same arguments, same result)."""
    B, Hq, R, D = q.shape
    Hk, K = k.shape[1], k.shape[2]
    device = q.device
    if B == 0 or R == 0 or K == 0:
        return torch.zeros(B, K, dtype=torch.float32, device=device)
    q = q if q.stride(3) == 1 else q.contiguous()
    k = k if k.stride(3) == 1 else k.contiguous()
    placeholder = torch.empty(1, dtype=torch.int8, device=device)
    rows = causal_rows.to(torch.int32).contiguous() if causal_rows is not None else placeholder
    valid = key_valid.to(torch.int8).contiguous() if key_valid is not None else placeholder
    dense = allowed.to(torch.int8).contiguous() if allowed is not None else placeholder
    w = weights.to(torch.float32).contiguous()
    upcast = q.dtype == torch.float32 or not q.is_cuda
    block_r, block_n, block_d = block_sizes(R, K, D, q.dtype, q.is_cuda)
    flags = dict(HAS_ROWS=causal_rows is not None, HAS_VALID=key_valid is not None, HAS_DENSE=allowed is not None,
                 UPCAST=upcast, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d)
    strides = (*q.stride()[:3], *k.stride()[:3])
    qk_scale = scale * math.log2(math.e)
    row_max = torch.empty(B, Hq, R, dtype=torch.float32, device=device)
    row_inv = torch.empty_like(row_max)
    with launching("attention row statistics"):
        _row_stats_kernel[(triton.cdiv(R, block_r), B * Hq)](
            q, k, rows, valid, dense, row_max, row_inv, R, K, D, Hq, Hq // Hk, qk_scale, *strides, **flags)
    part = torch.empty(Hk, B, K, dtype=torch.float32, device=device)
    with launching("attention received"):
        _received_kernel[(triton.cdiv(K, block_n), B, Hk)](
            q, k, w, rows, valid, dense, row_max, row_inv, part, B, R, K, D, Hq, Hq // Hk, qk_scale, 1.0 / Hq,
            *strides, **flags)
    return part.sum(0) if Hk > 1 else part[0]

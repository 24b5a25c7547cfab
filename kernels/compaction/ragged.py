"""Ragged compaction as one Triton launch: plan (prefix counts of the keep mask) and copy fused.

Program (tile, b, d-block) reads sample ``b``'s keep mask once to learn how many rows are kept before its tile, in
the whole row (hence the filler count ``W - n``) and which row is kept first; it then writes the kept rows of its
``BLOCK_L`` input rows to their slots, and the filler slots that fall in the same index range as copies of the
first kept row. The d-block axis splits wide rows (D = 4096) so a batch of one still fills the GPU. Positions and
the live mask are written by the d-block-0 programs. Reference: ``naive.compact``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtoken.kernels.dispatch import launching


@triton.jit
def _compact_kernel(
    x_ptr, keep_ptr, pos_ptr, out_ptr, out_pos_ptr, live_ptr,
    L, D, W, stride_xb, stride_xl, stride_ob, stride_ol,
    HAS_POS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, SCAN: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    dblock = tl.program_id(2)
    l0 = tile * BLOCK_L
    keep_row = keep_ptr + b * L
    before = 0
    total = 0
    first = L
    for c in range(0, L, SCAN):
        offs = c + tl.arange(0, SCAN)
        k = tl.load(keep_row + offs, mask=offs < L, other=0).to(tl.int32)
        total += tl.sum(k, axis=0)
        before += tl.sum(tl.where(offs < l0, k, 0), axis=0)
        first = tl.minimum(first, tl.min(tl.where(k > 0, offs, L), axis=0))
    pad = W - total

    offs_l = l0 + tl.arange(0, BLOCK_L)
    k = tl.load(keep_row + offs_l, mask=offs_l < L, other=0).to(tl.int32)
    kept = k > 0
    slot = pad + before + tl.cumsum(k, axis=0) - 1  # output slot of each kept row of the tile
    filler = offs_l < pad  # read as slots: the fillers with indices in this tile's range
    has_first = first < L
    first_vec = tl.zeros((BLOCK_D,), tl.int32) + first  # triton 3.9's interpreter rejects a vector mask & a scalar

    offs_d = dblock * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    src = x_ptr + b * stride_xb + offs_l[:, None] * stride_xl + offs_d[None, :]
    rows = tl.load(src, mask=kept[:, None] & in_d[None, :], other=0.0)
    out_row = out_ptr + b * stride_ob
    tl.store(out_row + slot[:, None] * stride_ol + offs_d[None, :], rows, mask=kept[:, None] & in_d[None, :])
    first_row = tl.load(x_ptr + b * stride_xb + first * stride_xl + offs_d, mask=in_d & (first_vec < L), other=0.0)
    copies = tl.broadcast_to(first_row[None, :], (BLOCK_L, BLOCK_D))
    tl.store(out_row + offs_l[:, None] * stride_ol + offs_d[None, :], copies, mask=filler[:, None] & in_d[None, :])

    if dblock == 0:
        if HAS_POS:
            pos = tl.load(pos_ptr + b * L + offs_l, mask=offs_l < L, other=0)
            pos_first = tl.load(pos_ptr + b * L + first, mask=has_first, other=0)
        else:
            pos = offs_l.to(tl.int64)
            pos_first = first.to(tl.int64)
        tl.store(out_pos_ptr + b * W + slot, pos, mask=kept)
        tl.store(live_ptr + b * W + slot, tl.full((BLOCK_L,), 1, tl.int8), mask=kept)
        tl.store(out_pos_ptr + b * W + offs_l, tl.zeros((BLOCK_L,), tl.int64) + pos_first, mask=filler)
        tl.store(live_ptr + b * W + offs_l, tl.zeros((BLOCK_L,), tl.int8), mask=filler)


def compact_triton(hidden: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor | None,
                   width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of ``naive.compact`` (same arguments, same result)."""
    B, L, D = hidden.shape
    if hidden.stride(2) != 1:
        hidden = hidden.contiguous()
    out = torch.empty(B, width, D, dtype=hidden.dtype, device=hidden.device)
    out_pos = torch.empty(B, width, dtype=torch.long, device=hidden.device)
    live = torch.empty(B, width, dtype=torch.int8, device=hidden.device)
    if B == 0 or width == 0 or D == 0:
        return out, out_pos, live.bool()
    keep = keep.to(torch.int8).contiguous()
    pos = positions.expand(B, L).to(torch.long).contiguous() if positions is not None else keep  # unused if None
    if hidden.is_cuda:
        block_l, block_d = 32, min(256, triton.next_power_of_2(D))
    else:  # the interpreter pays per program and per op: few, large blocks
        block_l, block_d = min(128, triton.next_power_of_2(L)), min(1024, triton.next_power_of_2(D))
    scan = min(1024, triton.next_power_of_2(L))
    grid = (triton.cdiv(L, block_l), B, triton.cdiv(D, block_d))
    with launching("ragged compaction"):
        _compact_kernel[grid](
            hidden, keep, pos, out, out_pos, live,
            L, D, width, hidden.stride(0), hidden.stride(1), out.stride(0), out.stride(1),
            HAS_POS=positions is not None, BLOCK_L=block_l, BLOCK_D=block_d, SCAN=scan,
        )
    return out, out_pos, live.view(torch.bool)

"""Ragged compaction: the Triton kernel (interpreter on CPU) equals its PyTorch reference exactly, the reference
equals the left-fill convention written out row by row, and DecoderPruner keeps the same tokens through either."""

from __future__ import annotations

import pytest
import torch
from gpu_compile import SMALLEST_SHARED_MEMORY, compile_for_gpus

from vtoken.kernels.compaction import compact

triton = pytest.importorskip("triton")


def ragged_keep(B: int, L: int, seed: int, counts: list[int] | None = None) -> torch.Tensor:
    """(B, L) keep masks with a different number of kept rows per sample (``counts``, else random >= 1)."""
    g = torch.Generator().manual_seed(seed)
    counts = counts or torch.randint(1, L + 1, (B,), generator=g).tolist()
    keep = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(counts):
        keep[b, torch.randperm(L, generator=g)[:n]] = True
    return keep


def by_hand(hidden, keep, positions):
    """The convention, one sample at a time: [first kept] * (W - n) + kept rows, fillers not live."""
    width = int(keep.sum(1).max())
    rows, pos, live = [], [], []
    for b in range(keep.shape[0]):
        idx = keep[b].nonzero().squeeze(1)
        pad = width - len(idx)
        src = torch.cat([idx[:1].repeat(pad), idx])
        rows.append(hidden[b, src])
        pos.append(src if positions is None else positions.expand(keep.shape)[b, src])
        live.append(torch.arange(width) >= pad)
    return torch.stack(rows), torch.stack(pos), torch.stack(live)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,L,D,counts", [
    (3, 37, 24, None),  # non-power-of-two rows and width, ragged
    (2, 100, 130, [1, 100]),  # k = 1 beside k = n
    (2, 9, 16, [9, 9]),  # k = n everywhere: no filler
    (4, 5, 16, [1, 1, 1, 1]),  # k = 1 everywhere: width 1
    (2, 300, 40, [7, 260]),  # rows over several tiles, fillers over several tiles
])
def test_kernel_equals_reference_and_convention(dtype, B, L, D, counts):
    hidden = torch.randn(B, L, D).to(dtype)
    keep = ragged_keep(B, L, seed=L, counts=counts)
    for positions in (None, torch.randint(0, 5000, (B, L)), torch.arange(7, 7 + L)):
        ref = compact(hidden, keep, positions, backend="torch")
        got = compact(hidden, keep, positions, backend="triton")
        expected = by_hand(hidden, keep, positions)
        for r, g, e in zip(ref, got, expected):
            assert g.dtype == r.dtype and torch.equal(g, r)
            assert torch.equal(r, e)
        assert ref[0].dtype == dtype and ref[1].dtype == torch.int64 and ref[2].dtype == torch.bool


def test_non_contiguous_rows_are_read_correctly():
    hidden = torch.randn(2, 40, 48)[:, :, :32]  # row stride 48, width 32
    keep = ragged_keep(2, 40, seed=3)
    ref = compact(hidden, keep, backend="torch")
    got = compact(hidden, keep, backend="triton")
    assert all(torch.equal(g, r) for g, r in zip(got, ref))


def test_bad_input_is_refused_with_what_is_allowed():
    hidden = torch.randn(2, 6, 4)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1] = False
    with pytest.raises(ValueError, match="every sample must keep at least one row"):
        compact(hidden, keep)
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        compact(hidden, torch.ones(2, 6))
    with pytest.raises(ValueError, match=r"hidden must be \(B, L, D\) and keep \(B, L\)"):
        compact(hidden, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="positions must be"):
        compact(hidden, torch.ones(2, 6, dtype=torch.bool), torch.arange(5))
    with pytest.raises(ValueError, match="backend='cuda' is not allowed"):
        compact(hidden, torch.ones(2, 6, dtype=torch.bool), backend="cuda")


@pytest.mark.slow
def test_kernel_compiles_for_gpus():
    shared = compile_for_gpus(r'''
from vtoken.kernels.compaction.ragged import _compact_kernel
dims = {n: "i32" for n in ["L", "D", "W", "stride_xb", "stride_xl", "stride_ob", "stride_ol"]}
for dtype, arch, has_pos in [("*fp16", 80, True), ("*bf16", 90, True), ("*bf16", 90, False), ("*fp32", 90, True)]:
    types = {"x_ptr": dtype, "out_ptr": dtype, "keep_ptr": "*i8", "pos_ptr": "*i64" if has_pos else "*i8",
             "out_pos_ptr": "*i64", "live_ptr": "*i8", **dims}
    consts = {"HAS_POS": has_pos, "BLOCK_L": 32, "BLOCK_D": 256, "SCAN": 1024}
    shared[f"compact {dtype} positions={has_pos} sm_{arch}"] = compile_kernel(
        _compact_kernel, types, consts, arch).metadata.shared
''')
    assert len(shared) == 4 and all(size <= SMALLEST_SHARED_MEMORY for size in shared.values()), shared

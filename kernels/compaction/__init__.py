"""Ragged compaction, one dispatch point (``backend`` as in :mod:`vtoken.kernels.dispatch`).

In-LLM pruning keeps a different number of tokens per sample; the next decoder layers need one (B, W, D) batch, the
original positions of what survived (RoPE keeps them) and which slots are real. On CUDA one Triton launch computes
the plan and copies the rows; elsewhere the PyTorch reference (sort, then gather).
"""

from __future__ import annotations

import torch

from vtoken.kernels.compaction import naive
from vtoken.kernels.dispatch import use_triton


def compact(hidden: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor | None = None,
            backend: str = "auto", width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the kept rows of ``hidden`` (B, L, D) per sample, in order, right-aligned at the widest sample.

    ``keep`` (B, L) bool must keep at least one row per sample. ``positions`` (B, L) or (L,) integer positions of the
    rows (None: 0 ... L-1). Returns ``(rows (B, W, D), positions (B, W) int64, live (B, W) bool)`` with
    ``W = max kept``: a sample that keeps fewer rows is left-filled with copies of its first kept row and position,
    ``live = False`` there. ``width``: the widest sample's count, when the caller knows it (then nothing is read from
    the device; the caller vouches that every sample keeps between 1 and ``width`` rows).
    """
    if hidden.dim() != 3 or keep.dim() != 2 or keep.shape != hidden.shape[:2]:
        raise ValueError(f"compact: hidden must be (B, L, D) and keep (B, L); got {tuple(hidden.shape)} and "
                         f"{tuple(keep.shape)}")
    if keep.dtype != torch.bool:
        raise ValueError(f"compact: keep must be a bool tensor, got {keep.dtype}")
    if positions is not None and positions.shape[-1] != keep.shape[1]:
        raise ValueError(f"compact: positions must be (B, L) or (L,) with L = {keep.shape[1]}; got "
                         f"{tuple(positions.shape)}")
    if width is None:
        counts = keep.sum(1)
        least, width = (int(v) for v in torch.stack([counts.min(), counts.max()]).tolist()) if keep.numel() else (1, 0)
        if least < 1:
            raise ValueError("compact: every sample must keep at least one row (a sample keeps none)")
    if use_triton(hidden, backend, eager_only=True):
        from vtoken.kernels.compaction.ragged import compact_triton

        return compact_triton(hidden, keep, positions, width)
    return naive.compact(hidden, keep, positions, width)


__all__ = ["compact"]

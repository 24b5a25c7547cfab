"""PyTorch definition of ragged compaction: the kept rows of every sample, packed to one width and left-filled.

Samples keep different numbers of tokens, but a batch must stay one (B, W, D) tensor. Rows are packed in order and
right-aligned at width ``W = max kept``; a sample that keeps ``n < W`` tokens gets ``W - n`` filler slots on the
left, each a copy of its first kept token (same row, same position) with ``live = False``, so the caller can mask
the fillers out as keys and every sample computes exactly what it would alone.
"""

from __future__ import annotations

import torch


def compaction_plan(keep: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) bool keep -> ``sel`` (B, W) source row of every slot and ``live`` (B, W), False for fillers."""
    B, L = keep.shape
    counts = keep.sum(1)
    pos = torch.arange(L, device=keep.device)
    ordered = torch.where(keep, pos, L).sort(dim=1).values  # kept rows first, in order
    slot = torch.arange(width, device=keep.device) - (width - counts).unsqueeze(1)  # < 0: filler
    return ordered[:, :width].gather(1, slot.clamp(min=0)), slot >= 0


def compact(hidden: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor | None,
            width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, D) rows, (B, L) keep, (B, L) positions (None: 0 ... L-1) -> (B, W, D), (B, W) positions, (B, W) live."""
    B, L = keep.shape
    sel, live = compaction_plan(keep, width)
    rows = hidden.gather(1, sel.unsqueeze(2).expand(B, width, hidden.shape[2]))
    if positions is None:
        return rows, sel, live
    return rows, positions.expand(B, L).gather(1, sel), live

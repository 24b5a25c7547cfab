"""Column algebra of a call's tokens: the prompt a boundary reduction shortens (``PromptEdit``), gathers by a column
map, and the attention masks that follow the columns."""

from __future__ import annotations

import torch


class PromptEdit:
    """Columns removed from a (B, L) run of new tokens (a prompt, or a later turn on top of a cache), with rows
    re-filled on the left to a common length. ``col_map[b, j]`` is the input column of output column j, -1 for a
    filler (left padding of the shortened run).

    ``keep`` (B, L) marks the columns that stay and ``kept_counts`` says, on the host, how many each row keeps: every
    shape is then known without reading the device. When every row keeps as many, the map is one ``nonzero_static``.
    """

    def __init__(self, keep: torch.Tensor, kept_counts: list[int]):
        B, L = keep.shape
        device = keep.device
        self.keep = keep
        self.length_in, self.length_out = L, max(kept_counts)
        self.added_padding = min(kept_counts) != self.length_out  # the longest row never gets any
        if not self.added_padding:  # row-major positions of the kept columns, then each row's own columns
            flat = torch.nonzero_static(keep.flatten(), size=B * self.length_out).view(B, self.length_out)
            self.col_map = flat if B == 1 else flat - torch.arange(0, B * L, L, device=device).unsqueeze(1)
            return
        n_pad = self.length_out - keep.sum(1)
        cols = torch.where(keep, torch.arange(L, device=device), L).sort(dim=1).values[:, : self.length_out]
        slot = torch.arange(self.length_out, device=device) - n_pad.unsqueeze(1)  # < 0: new left padding
        self.col_map = torch.where(slot >= 0, cols.gather(1, slot.clamp(min=0)), -1)

    @property
    def shift(self) -> torch.Tensor:
        """(B,) tokens removed per row."""
        return self.length_in - self.keep.sum(1)

    def gather(self, x: torch.Tensor, fill) -> torch.Tensor:
        """Apply the column map to a (B, L, ...) tensor; new padding columns get ``fill``."""
        if not self.added_padding:
            return gather_rows(x, self.col_map, 1)
        return gather_columns(x, self.col_map, fill, dim=1)

    def position_ids(self, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        """Positions of the shortened run: a kept token moves down by the tokens dropped before it in the run, which
        is its column minus its index among the kept ones (fillers get 0)."""
        if position_ids is None:
            if not self.added_padding:
                return None  # the host's default arange over the shorter prompt is already right
            B = self.col_map.shape[0]
            position_ids = torch.arange(self.length_in, device=self.col_map.device).expand(B, -1)
        index = torch.arange(self.length_out, device=self.col_map.device)
        if self.added_padding:  # a row's kept columns start after its new left padding
            index = index - (self.col_map < 0).sum(1, keepdim=True)
        moved = self.gather(position_ids, 0) - (self.col_map - index).to(position_ids.device)
        return torch.where(self.col_map >= 0, moved, 0) if self.added_padding else moved


def gather_columns(x: torch.Tensor, index: torch.Tensor, fill, dim: int) -> torch.Tensor:
    """``x`` gathered along ``dim`` by a (B, K) index in which -1 means "no source": those entries get ``fill``."""
    out = gather_rows(x, index.clamp(min=0), dim)
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    return torch.where((index < 0).view(shape), torch.as_tensor(fill, dtype=x.dtype, device=x.device), out)


def gather_rows(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``x`` gathered along ``dim`` by a (B, K) index; a batch-1 ``x`` is broadcast first."""
    if x.shape[0] == 1 and index.shape[0] == 1:  # one row: one index_select (fewer ops than view, expand, gather)
        return x.index_select(dim, index[0])
    if x.shape[0] == 1 and index.shape[0] > 1:
        x = x.expand(index.shape[0], *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    idx = index.view(shape).expand(*[s if d != dim else index.shape[1] for d, s in enumerate(x.shape)])
    return x.gather(dim, idx)


def blocked_value(mask: torch.Tensor):
    """The value that forbids attention in a mask of this dtype (bool: False; additive float: the dtype's min)."""
    if mask.dtype == torch.bool:
        return False
    return torch.finfo(mask.dtype).min if mask.is_floating_point() else 0


def mask_valid(mask: torch.Tensor | dict | None, shape: tuple[int, int], device, first: bool = False) -> torch.Tensor:
    """(B, L) real (non-padding) tokens of a call, from a 2-D padding mask or a causal 4-D mask (its last query row
    sees every real key), or all True. A 4-D mask's keys end with the call's L tokens, unless ``first``: a static
    cache's first call, whose mask spans every slot, the call's tokens first."""
    if isinstance(mask, dict):  # one mask per layer type (Qwen2's full and sliding attention): the full one
        mask = mask.get("full_attention", next((m for m in mask.values() if m is not None), None))
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if mask.dim() == 4:
        return mask_allows(mask[:, 0, -1, :shape[1]] if first else mask[:, 0, -1, -shape[1]:]).expand(shape)
    return mask[:, -shape[1]:].bool()


def remap_mask(mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, filler_rows: bool) -> torch.Tensor:
    """A call's mask moved from the caller's columns to the cache's slots.

    ``cols`` (B, K): for every key slot, the caller's column (-1: filler, never attended). ``rows`` (B, q): for every
    query, the caller's query row (-1: filler; ``filler_rows``, known on the host, says whether any is); only 4-D
    masks have rows. A filler query attends to itself only, so no softmax row is empty.
    """
    if mask.dim() == 2:
        return gather_columns(mask, cols, 0, dim=1)
    blocked = blocked_value(mask)
    out = gather_columns(gather_columns(mask, rows, blocked, dim=2), cols, blocked, dim=3)
    if filler_rows:
        filler = rows < 0
        q, K = rows.shape[1], cols.shape[1]
        own = torch.zeros(rows.shape[0], 1, q, K, dtype=torch.bool, device=mask.device)
        own[:, 0, torch.arange(q), K - q + torch.arange(q)] = True
        allowed = True if mask.dtype == torch.bool else 0
        out = torch.where(own & filler[:, None, :, None], torch.as_tensor(allowed, dtype=mask.dtype), out)
    return out


def mask_allows(mask: torch.Tensor) -> torch.Tensor:
    """Boolean view of a 4-D attention mask (bool: True attends; float: additive, 0 attends)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def forbid_columns(mask: torch.Tensor, forbidden: torch.Tensor) -> torch.Tensor:
    """Mask out key columns (B, K) in a 4-D (B, h, q, K) or 2-D (B, K) mask of either dtype."""
    cols = forbidden if mask.dim() == 2 else forbidden[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & ~cols
    if mask.is_floating_point():
        return mask.masked_fill(cols, torch.finfo(mask.dtype).min)
    return mask * (~cols).to(mask.dtype)


def placeholder_runs(placeholders: torch.Tensor, most: int) -> list[tuple[int, int]] | None:
    """``(row, length)`` of each run of consecutive placeholders in a (B, L) mask, in order; None if there are more
    than ``most`` runs. A run never continues into the next row.

    One read of the device (the runs), for a host whose call does not say which encoder views form one item; the
    rows come with it, so the batch's layout needs no read of its own."""
    starts = placeholders & ~torch.nn.functional.pad(placeholders[:, :-1], (1, 0))
    run = starts.flatten().cumsum(0).clamp(max=most + 1) * placeholders.flatten()  # 1-based; 0: not a placeholder
    row = torch.arange(placeholders.shape[0], device=placeholders.device).unsqueeze(1)
    per_token = torch.stack([placeholders.flatten().long(), (starts * row).flatten()])  # length, row of the start
    runs = torch.zeros(2, most + 2, dtype=torch.long, device=placeholders.device)
    lengths, rows = runs.index_add_(1, run, per_token).tolist()  # the one read
    if lengths[most + 1]:
        return None
    return [(r, n) for r, n in zip(rows[1: most + 1], lengths[1: most + 1]) if n]

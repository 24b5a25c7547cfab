"""What a KV cache written through a patched model holds: ``CacheLayout``, which rides on the cache object."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from vtoken.adapters.vlm.columns import PromptEdit

LAYOUT_ATTR = "_vtoken_layout"


@dataclass
class CacheLayout:
    """How the slots of a KV cache written through a patched model map onto the caller's token columns.

    ``generate()`` and chat loops keep addressing a conversation by its original columns (every image placeholder
    included) while the cache holds fewer slots. The first ``source.shape[1]`` slots come from the original columns
    in ``source`` (-1: a filler slot that only equalises row lengths, never attended); later slots continue the
    columns one to one. The layout rides on the cache object itself, so any cache this model wrote (an earlier
    turn's, a deep copy) can be continued, and a cache it did not write is recognised as such.
    """

    source: torch.Tensor  # (B, E) caller column of each of the first E slots, -1 for fillers
    columns: int  # caller columns the cache holds (every row alike)
    slots: int  # slots written (layer 0)
    shift: torch.Tensor  # (B,) real tokens removed so far: later positions move down by it
    # the caller's ids (B, columns) in the chunks the calls gave them, joined when a continuation is checked
    ids: tuple[torch.Tensor, ...] | None
    method: str
    pruned: list | None = None  # in-LLM pruned prefill: per decoder layer, Alive or None
    pruned_slots: int = 0  # slots that prefill wrote (its LLM input length)
    rope_deltas: torch.Tensor | None = None  # M-RoPE hosts: (B, 1) offset of text positions after the prompt
    # per-row tensors (first dim = row) a method carries with the conversation, e.g. CoreMatching's decode neurons
    row_state: dict | None = None
    fillers: bool = False  # whether any row holds filler slots (host: decode steps then need a mask)
    renumbered: bool = False  # whether a boundary reduction removed tokens (later positions then move down)
    uniform_shift: int | None = 0  # the shift when every row has the same one (host), None otherwise
    deltas_source: Any = None  # M-RoPE hosts: the model's own rope-deltas object when the prefill recorded them

    def held_ids(self) -> torch.Tensor | None:
        """(B, columns) the caller's ids so far (joined once, when a continuation is checked)."""
        if not self.ids:
            return None
        if len(self.ids) > 1:
            self.ids = (torch.cat(self.ids, dim=1),)
        return self.ids[0]

    def shift_column(self) -> torch.Tensor:
        """(B, 1) the shift as a column, made once per layout (decode steps subtract it from their positions)."""
        column = self.__dict__.get("_shift_column")
        if column is None:
            column = self.__dict__["_shift_column"] = self.shift.unsqueeze(1)
        return column

    @staticmethod
    def of(cache) -> CacheLayout | None:
        return getattr(cache, LAYOUT_ATTR, None) if cache is not None else None

    @staticmethod
    def identity(batch: int, length: int, device, method: str) -> CacheLayout:
        """A cache written without vtoken (or without any change): slot i holds column i."""
        return CacheLayout(torch.empty(batch, 0, dtype=torch.long, device=device), length, length,
                           torch.zeros(batch, dtype=torch.long, device=device), None, method)

    @staticmethod
    def of_prefill(edit: PromptEdit, ids: torch.Tensor | None, method: str) -> CacheLayout:
        """The layout of a fresh prefill whose prompt ``edit`` shortened."""
        layout = CacheLayout(edit.col_map, edit.length_in, edit.length_out, edit.shift,
                             None if ids is None else (ids,), method, fillers=edit.added_padding, renumbered=True,
                             uniform_shift=None if edit.added_padding else edit.length_in - edit.length_out)
        layout.shift_column()  # made here, not in the first decode step
        return layout

    @property
    def batch(self) -> int:
        return self.source.shape[0]

    def attach(self, cache) -> None:
        setattr(cache, LAYOUT_ATTR, self)

    @staticmethod
    def detach(cache) -> None:
        cache.__dict__.pop(LAYOUT_ATTR, None)

    def slot_columns(self, width: int) -> torch.Tensor:
        """(B, width) caller column of slots 0 ... width-1."""
        edited = self.source.shape[1]
        rest = torch.arange(edited, width, device=self.source.device) + (self.columns - self.slots)
        return torch.cat([self.source, rest.expand(self.batch, -1)], dim=1)

    def expand(self, batch: int) -> CacheLayout:
        """The layout for ``batch`` rows when generate() repeats every row (beam search, several sequences)."""
        if batch == self.batch:
            return self
        if batch % self.batch:
            raise ValueError(f"vtoken: a call with {batch} rows continues a cache written for {self.batch}")
        n = batch // self.batch
        pruned = None if self.pruned is None else repeated_records(self.pruned, n)
        deltas = None if self.rope_deltas is None else self.rope_deltas.repeat_interleave(n, 0)
        rows = None if self.row_state is None else {
            k: t.repeat_interleave(n, 0) if isinstance(t, torch.Tensor) else t for k, t in self.row_state.items()}
        ids = self.held_ids()
        return dataclasses.replace(
            self, source=self.source.repeat_interleave(n, 0), shift=self.shift.repeat_interleave(n, 0),
            ids=None if ids is None else (ids.repeat_interleave(n, 0),), pruned=pruned, rope_deltas=deltas,
            row_state=rows)

    def extended(self, edit: PromptEdit | None, ids: torch.Tensor | None, length_in: int) -> CacheLayout:
        """The layout after a call that fed ``length_in`` new caller columns, shortened by ``edit`` if any."""
        joined = None if self.ids is None or ids is None else (*self.ids, ids)
        if edit is None:
            out = dataclasses.replace(self, columns=self.columns + length_in, slots=self.slots + length_in,
                                      ids=joined)
            # the shift did not change: what was made from it (``shift_column``, a host's own) carries over
            out.__dict__.update({k: v for k, v in self.__dict__.items() if k.startswith("_")})
            return out
        new = torch.where(edit.col_map >= 0, edit.col_map + self.columns, -1)
        return dataclasses.replace(
            self, source=torch.cat([self.slot_columns(self.slots), new], dim=1), columns=self.columns + length_in,
            slots=self.slots + edit.length_out, shift=self.shift + edit.shift.to(self.shift.device), ids=joined,
            fillers=self.fillers or edit.added_padding, renumbered=True, uniform_shift=None)


def repeated_records(records: list, n: int) -> list:
    """Each layer's pruned record (``Alive`` or None) with every row repeated ``n`` times; layers that shared one
    record (the layers of one stage) share its repeat, as decode steps move one mask per distinct record."""
    repeats: dict = {}
    for rec in records:
        if rec is not None and (id(rec.alive), id(rec.live)) not in repeats:
            repeats[id(rec.alive), id(rec.live)] = rec.repeated(n)
    return [None if rec is None else repeats[id(rec.alive), id(rec.live)] for rec in records]


DECODE_NEURONS = "decode_neurons"  # CacheLayout.row_state key: (B, decode FFN layers, k) neurons per row


DECODE_LAYERS = "decode_layers"  # ... and the layers they were chosen for (a tuple, the same for every row)

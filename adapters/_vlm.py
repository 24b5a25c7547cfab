"""Shared VLM machinery: shortening the prompt at the multimodal boundary, and dropping tokens between decoder
layers during prefill (the mechanism of ARCHITECTURE.md), for Llama-like HF decoders.

Both keep the host's own attention implementation (eager, SDPA, FlashAttention) and ``generate()`` untouched:
only the inputs of the LLM call and of each decoder layer are edited, per forward, through hooks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from vtoken.adapters import _compat
from vtoken.adapters._ffn import DecodeFFN
from vtoken.kernels.attention import attention_received
from vtoken.kernels.attention.naive import allowed_keys
from vtoken.kernels.compaction import compact
from vtoken.methods.base import SUBLAYER_KINDS, LayerContext, SublayerContext, VisualTokenMethod


class OnRead:
    """A stats value that is read from the device only when someone looks at it: recording what a call did must not
    stall it (on a GPU every read of device data waits for the queue to drain)."""

    __slots__ = ("read",)

    def __init__(self, read: Callable[[], Any]):
        self.read = read


def settled(value):
    """``value`` with every :class:`OnRead` inside it (lists, tuples, dicts) read, and tensors in a record made
    lists."""
    if isinstance(value, OnRead):
        return settled(value.read())
    if isinstance(value, list):
        return [settled(v) for v in value]
    if isinstance(value, dict):
        return {k: settled(v) for k, v in value.items()}
    return value


def record_value(value):
    """A method's record entry as users read it: tensors become lists."""
    return value.tolist() if isinstance(value, torch.Tensor) else value


class VLMStats:
    """What the last prefill did. Lists are per image (``visual_tokens_in/kept``), per sample
    (``visual_tokens_llm``) or per decoder layer then per sample (``tokens_per_layer``).

    The adapter records into ``raw`` (device tensors behind :class:`OnRead`, stopwatches); a field is read from the
    device when a user first looks at it, so recording costs no sync.
    """

    FIELDS = dict(
        visual_tokens_in=list, visual_tokens_kept=list,
        kept_indices=list,  # per image: kept token indices (CPU tensor), None for synthesised tokens
        visual_tokens_llm=list, tokens_per_layer=list, visual_tokens_per_layer=list,
        tokens_per_frame=list,  # per item: kept tokens per frame (videos)
        records=dict,  # scoring layer -> a method's diagnostics (e.g. ToDRE's attention ratios)
        # layer -> per sample, the LLM-input positions of the visual tokens still alive from that layer on
        visual_alive=dict,
        notes=list,
    )

    def __init__(self):
        self.prefills = 0
        self.vision = None  # stats of a method running inside the vision tower (token_clustering), last call
        self.clear()

    def clear(self) -> None:
        self.raw = {name: kind() for name, kind in self.FIELDS.items()}
        self.selection, self.scoring = Stopwatch(), Stopwatch()

    def reset(self) -> None:
        """A new prefill: what the last one recorded goes."""
        self.clear()
        self.prefills += 1

    def __getattr__(self, name):
        raw = self.__dict__.get("raw")
        if raw is None or name not in raw:
            raise AttributeError(name)
        value = settled(raw[name])
        if name == "records":
            value = {layer: {k: record_value(v) for k, v in rec.items()} for layer, rec in value.items()}
        raw[name] = value
        return value

    def __setattr__(self, name, value):
        if name in self.FIELDS:
            self.raw[name] = value
        else:
            object.__setattr__(self, name, value)

    @property
    def selection_time_s(self) -> float:
        """Seconds in the boundary stage's selection (read at the first look; no sync during the call)."""
        return self.selection.seconds

    @property
    def scoring_time_s(self) -> float:
        """Seconds in the in-LLM scoring and observing."""
        return self.scoring.seconds

    def __repr__(self) -> str:
        shown = {name: getattr(self, name) for name in ("visual_tokens_in", "visual_tokens_kept", "visual_tokens_llm")}
        return f"VLMStats(prefills={self.prefills}, {', '.join(f'{k}={v}' for k, v in shown.items())})"


class Stopwatch:
    """Accumulated wall time of some blocks. On CUDA each block is a pair of events recorded in the stream, so timing
    adds no sync; the time is read (waiting for the last event) only when asked for."""

    def __init__(self, seconds: float = 0.0):
        self.host_seconds = seconds
        self.events: list = []

    def __call__(self, device: torch.device):
        watch = self

        class _Block:
            def __enter__(self):
                if device.type == "cuda":
                    self.start = torch.cuda.Event(enable_timing=True)
                    self.start.record()
                else:
                    self.t0 = time.perf_counter()
                return self

            def __exit__(self, *exc):
                if device.type == "cuda":
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                    watch.events.append((self.start, end))
                else:
                    watch.host_seconds += time.perf_counter() - self.t0

        return _Block()

    @property
    def seconds(self) -> float:
        if self.events:  # the first look after a call: wait for its last event
            self.events[-1][1].synchronize()
            self.host_seconds += sum(start.elapsed_time(end) for start, end in self.events) / 1000.0
            self.events = []
        return self.host_seconds


# ------------------------------------------------------------------------------------------------------------
# Boundary: remove placeholder columns from the prompt
# ------------------------------------------------------------------------------------------------------------
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


def blocked_value(mask: torch.Tensor):
    """The value that forbids attention in a mask of this dtype (bool: False; additive float: the dtype's min)."""
    if mask.dtype == torch.bool:
        return False
    return torch.finfo(mask.dtype).min if mask.is_floating_point() else 0


def mask_valid(mask: torch.Tensor | None, shape: tuple[int, int], device) -> torch.Tensor:
    """(B, L) real (non-padding) tokens of a call, from a 2-D padding mask or a causal 4-D mask (its last query row
    sees every real key), or all True."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if mask.dim() == 4:
        return mask_allows(mask[:, 0, -1, -shape[1]:]).expand(shape)
    return mask[:, -shape[1]:].bool()


def remap_mask(mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """A call's mask moved from the caller's columns to the cache's slots.

    ``cols`` (B, K): for every key slot, the caller's column (-1: filler, never attended). ``rows`` (B, q): for every
    query, the caller's query row (-1: filler); only 4-D masks have rows. A filler query attends to itself only,
    so no softmax row is empty.
    """
    if mask.dim() == 2:
        return gather_columns(mask, cols, 0, dim=1)
    blocked = blocked_value(mask)
    out = gather_columns(gather_columns(mask, rows, blocked, dim=2), cols, blocked, dim=3)
    filler = rows < 0
    if bool(filler.any()):
        q, K = rows.shape[1], cols.shape[1]
        own = torch.zeros(rows.shape[0], 1, q, K, dtype=torch.bool, device=mask.device)
        own[:, 0, torch.arange(q), K - q + torch.arange(q)] = True
        allowed = True if mask.dtype == torch.bool else 0
        out = torch.where(own & filler[:, None, :, None], torch.as_tensor(allowed, dtype=mask.dtype), out)
    return out


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
        pruned = None if self.pruned is None else [None if rec is None else rec.repeated(n) for rec in self.pruned]
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


# ------------------------------------------------------------------------------------------------------------
# In-LLM: drop tokens between decoder layers during prefill
# ------------------------------------------------------------------------------------------------------------
DECODE_NEURONS = "decode_neurons"  # CacheLayout.row_state key: (B, decode FFN layers, k) neurons per row
DECODE_LAYERS = "decode_layers"  # ... and the layers they were chosen for (a tuple, the same for every row)


_KEYS = "_vtoken_scoring_keys"  # a scoring call's own kwargs copy keeps its recomputed keys here


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


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


def check_layer_kwargs(kwargs: dict) -> None:
    """Refuse per-token data the hooks would not slice: a new upstream keyword must fail loudly, not misalign."""
    unknown = [k for k in _compat.unknown_layer_kwargs(kwargs)
               if isinstance(kwargs[k], torch.Tensor)
               or (isinstance(kwargs[k], (tuple, list)) and any(isinstance(v, torch.Tensor) for v in kwargs[k]))]
    if unknown:
        import transformers

        raise RuntimeError(
            f"vtoken: decoder layers received {unknown}, which in-LLM pruning does not know how to slice "
            f"(transformers {transformers.__version__}); install a transformers version inside vtoken's tested "
            "range (see its README) or report this upstream change"
        )


class Alive(NamedTuple):
    """The tokens a decoder layer runs on after in-LLM pruning: per row the LLM-input positions of its slots, which
    slots are real (False: a filler that only equalises row lengths), and whether any row has fillers (host)."""

    alive: torch.Tensor  # (B, K)
    live: torch.Tensor  # (B, K)
    fillers: bool

    def repeated(self, n: int) -> Alive:
        return Alive(self.alive.repeat_interleave(n, 0), self.live.repeat_interleave(n, 0), self.fillers)


@dataclass
class TokenState:
    """Per prefill: which layer-0 positions are alive at the current layer, per sample. The counts per row are kept
    on the host, so that sizing the next compacted batch needs no read of the device."""

    visual: torch.Tensor  # (B, L0) at the LLM input
    valid: torch.Tensor  # (B, L0) real (non-padding) tokens
    visual_counts: list[int]  # per row: visual tokens alive (host)
    live_counts: list[int]  # per row: real slots (every token but fillers) at the current layer (host)
    input_visual_counts: list[int] = field(default_factory=list)  # per row: visual tokens that entered the LLM
    alive: torch.Tensor | None = None  # (B, K) layer-0 positions at the current layer; None = all
    live: torch.Tensor | None = None  # (B, K) False for filler slots that only equalise row lengths
    fillers: bool = False  # whether any row has filler slots now
    pending: tuple | None = None  # (keep mask, width, fillers) to apply at the next layer's input
    version: int = 0
    per_layer: list = field(default_factory=list)  # per layer: Alive or None, reused by decode steps
    sliced: tuple | None = None  # (version, id(source), kwargs) cache of the sliced shared kwargs
    sets: tuple | None = None  # (version, valid, visual, positions, counts) at the current layer
    scratch: dict = field(default_factory=dict)  # the method's own per-prefill state (``LayerContext.state``)


class DecoderPruner:
    """Installs pre-hooks on every decoder layer of a Llama-like HF decoder and prunes visual tokens during
    prefill according to ``method.score_layers`` / ``method.prune``; forward hooks on the sub-layers named by
    ``method.observed_sublayers`` show them to ``method.observe``; the MLPs of ``method.decode_ffn_layers`` run
    the neurons ``method.after_prefill`` chose in later single-token steps.

    The host adapter calls :meth:`begin_prefill` (with the LLM input's visual and padding masks),
    :meth:`begin_decode` (with the layout of the cache a call continues) or :meth:`idle` before each LLM call, and
    :meth:`end_prefill` with the cache a prefill wrote.
    """

    def __init__(self, decoder, method: VisualTokenMethod, stats: VLMStats, handle):
        self.layers = decoder.layers
        self.config = decoder.config
        self.method = method
        self.stats = stats
        n = len(self.layers)
        self.score_layers = set(method.score_layers(n))
        self.backend = getattr(method, "backend", "auto")  # kernels: compaction and attention-row scoring
        self.observed = {kind: tuple(layers) for kind, layers in method.observed_sublayers(n).items() if layers}
        self.state: TokenState | None = None
        self.mode = "idle"
        self.decode_records: list = []
        self.decode_slots = 0
        for i, layer in enumerate(self.layers):
            handle.claim(layer, "vtoken.decoder_layer")
            handle.forward_pre_hook(layer, self._make_hook(i), with_kwargs=True)
        for kind, indices in self.observed.items():
            if kind not in SUBLAYER_KINDS or any(not 0 <= i < n for i in indices):
                raise RuntimeError(f"{method.method_name}: cannot observe {kind!r} in layers {indices} of a {n}-layer "
                                   f"decoder (kinds: {', '.join(SUBLAYER_KINDS)})")
            for i in indices:
                module = _compat.decoder_sublayer(self.layers[i], kind)
                handle.forward_hook(module, self._make_observer(i, kind), with_kwargs=True)
        ffn_layers = tuple(method.decode_ffn_layers(n))
        self.ffn = DecodeFFN(self.layers, ffn_layers, handle, method.method_name) if ffn_layers else None

    # -- driven by the host ----------------------------------------------------------------------------------
    def begin_prefill(self, visual: torch.Tensor, valid: torch.Tensor, visual_counts: list[int] | None = None) -> None:
        """A prefill of the LLM input with ``visual`` and ``valid`` (B, L) masks; ``visual_counts``, the visual tokens
        of each row, when the host knows them (otherwise they are read once, here)."""
        if visual_counts is None:  # one read per prefill: every later size follows on the host
            visual_counts = visual.sum(1).tolist()
        B, L = visual.shape
        self.state = TokenState(visual=visual, valid=valid, visual_counts=list(visual_counts), live_counts=[L] * B,
                                input_visual_counts=list(visual_counts))
        self.mode = "prefill" if self.score_layers or self.observed else "idle"
        if self.ffn is not None:
            self.ffn.activate(None)

    def pruned_layers(self) -> list | None:
        """Per layer, the :class:`Alive` sets of the last prefill; None when it pruned nothing."""
        records = self.state.per_layer if self.state is not None else []
        return records if any(rec is not None for rec in records) else None

    def begin_decode(self, layout) -> None:
        """A call that continues a cache: layers that pruned its prefill hold fewer slots, so their masks shrink, and
        the conversation's decode neurons (if its prefill chose any) drive the sliced FFNs."""
        if layout is not None and layout.pruned is not None:
            self.mode, self.decode_records, self.decode_slots = "decode", layout.pruned, layout.pruned_slots
        else:
            self.mode = "idle"
        self.decode_masks = {}  # per step: the mask of each distinct pruned record, made once for all its layers
        if self.ffn is not None:
            rows = layout.row_state if layout is not None and layout.row_state is not None else {}
            if DECODE_LAYERS in rows and rows[DECODE_LAYERS] != self.ffn.indices:
                raise ValueError(
                    f"vtoken: this KV cache's decode neurons were chosen for layers {list(rows[DECODE_LAYERS])}"
                    f", but {self.method.method_name} now converts layers {list(self.ffn.indices)}; continue it with "
                    "the configuration that wrote it, or start the conversation again")
            self.ffn.activate(rows.get(DECODE_NEURONS))

    def idle(self) -> None:
        self.mode = "idle"
        if self.ffn is not None:
            self.ffn.activate(None)

    def end_prefill(self, cache) -> dict | None:
        """After a prefill that wrote ``cache``: zero the cached K/V the method asks for, slice the decode FFNs, and
        return the per-row state the cache's layout must carry (None: nothing)."""
        if self.mode != "prefill":
            return None
        outcome = self.method.after_prefill(self.state.scratch)
        if outcome is None:
            return None
        for index, zero in outcome.zero_kv.items():
            self._zero_kv(cache, index, zero)
        if not outcome.decode_neurons:
            return None
        if self.ffn is None or set(outcome.decode_neurons) != set(self.ffn.indices):
            raise RuntimeError(f"{self.method.method_name}: decode neurons for layers {sorted(outcome.decode_neurons)}"
                               f", declared decode FFN layers {self.ffn.indices if self.ffn else ()}")
        neurons = torch.stack([outcome.decode_neurons[i] for i in self.ffn.indices], dim=1)  # (B, layers, k)
        self.ffn.prepare(neurons)
        return {DECODE_NEURONS: neurons, DECODE_LAYERS: self.ffn.indices}

    def _zero_kv(self, cache, index: int, zero: torch.Tensor) -> None:
        """Zero this prefill's cached keys and values of layer ``index`` at LLM-input positions ``zero`` (B, L0)."""
        record = self.state.per_layer[index]
        if record is not None:  # the layer cached only the alive positions
            zero = gather_rows(zero, record.alive) & record.live
        keys, values = _compat.cache_layer_kv(cache, index)
        where = zero.to(keys.device)[:, None, :, None]
        slots = where.shape[2]
        keys[:, :, :slots].masked_fill_(where, 0)
        values[:, :, :slots].masked_fill_(where, 0)

    # -- the hook ----------------------------------------------------------------------------------------------
    def _make_hook(self, index: int):
        def hook(module, args, kwargs):
            if self.mode != "idle" and index == 0:
                check_layer_kwargs(kwargs)
            if self.mode == "prefill":
                return self._prefill(index, module, args, kwargs)
            if self.mode == "decode":
                return self._decode(index, args, kwargs)
            return None

        return hook

    def _prefill(self, index, layer, args, kwargs):
        st = self.state
        hidden = args[0] if args else kwargs.pop("hidden_states")
        shared = kwargs  # as every layer receives them; sliced below for this layer
        if st.pending is not None:
            hidden = self._apply_pending(hidden)
        if st.alive is not None:
            kwargs = self._sliced_kwargs(shared, hidden.shape[0])
        if index in self.score_layers:
            with self.stats.scoring(hidden.device):
                self._score(index, layer, hidden, kwargs)
            if self.method.prune_at_scored_layer and st.pending is not None:  # this layer already runs without them
                hidden = self._apply_pending(hidden)
                kwargs = self._sliced_kwargs(shared, hidden.shape[0])
        st.per_layer.append(None if st.alive is None else Alive(st.alive, st.live, st.fillers))
        counts = self._sets(hidden.shape[0])[3]  # the same record for every layer between two prunes
        self.stats.raw["tokens_per_layer"].append(counts[0])
        self.stats.raw["visual_tokens_per_layer"].append(counts[1])
        return (hidden, *args[1:]), kwargs

    def _apply_pending(self, hidden: torch.Tensor) -> torch.Tensor:
        """Move to the selection the last scoring made: the alive sets and the hidden states shrink together (one
        ragged-compaction launch on CUDA); its width was counted on the host."""
        st = self.state
        (keep, width, fillers), st.pending = st.pending, None
        hidden, st.alive, st.live = compact(hidden, keep, st.alive, self.backend, width=width)
        st.fillers = fillers
        st.version += 1
        return hidden

    def _sets(self, batch: int) -> tuple:
        """(valid, visual, positions, per-row counts for the stats) at the current layer, made once per change."""
        st = self.state
        if st.sets is None or st.sets[0] != st.version:
            if st.alive is None:
                valid, visual = st.valid.expand(batch, -1), st.visual.expand(batch, -1)
                positions = torch.arange(st.valid.shape[1], device=st.valid.device).expand(batch, -1)
            else:
                valid = gather_rows(st.valid, st.alive) & st.live
                visual = gather_rows(st.visual, st.alive) & st.live
                positions = st.alive
            counts = (OnRead(lambda v=valid: v.sum(1).tolist()),
                      OnRead(lambda v=valid, u=visual: (u & v).sum(1).tolist()))
            st.sets = (st.version, valid, visual, positions, counts)
        return st.sets[1:]

    def _current_sets(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        valid, visual, _, _ = self._sets(batch)
        return valid, visual

    def _positions(self, batch: int, length: int) -> torch.Tensor:
        """(B, L) LLM-input position of each row at the current layer."""
        return self._sets(batch)[2]

    def _make_observer(self, index: int, kind: str):
        def observe(module, args, kwargs, output):
            if self.mode != "prefill":
                return None
            x, y = _compat.module_io(args, kwargs, output)
            valid, visual, positions, _ = self._sets(x.shape[0])
            with self.stats.scoring(x.device):
                self.method.observe(SublayerContext(
                    layer=index, num_layers=len(self.layers), kind=kind, input=x, output=y, valid=valid, visual=visual,
                    positions=positions, n_positions=self.state.valid.shape[1], state=self.state.scratch))
            return None

        return observe

    def _score(self, index, layer, hidden, kwargs) -> None:
        st = self.state
        kwargs = dict(kwargs)  # scoring's own copy: it caches the recomputed keys in it
        valid, visual, positions, _ = self._sets(hidden.shape[0])
        ctx = LayerContext(
            layer=index,
            num_layers=len(self.layers),
            hidden=hidden,
            valid=valid,
            visual=visual,
            n_visual_input=st.input_visual_counts,
            attention=lambda rows: self._attention_rows(layer, hidden, kwargs, rows),
            received=lambda rows, weights: self._attention_received(layer, hidden, kwargs, rows, weights),
            positions=positions,
            state=st.scratch,
            alive_counts=list(st.live_counts),
            visual_counts=list(st.visual_counts),
        )
        keep = self.method.prune(ctx)
        if ctx.record:
            self.stats.raw["records"][index] = dict(ctx.record)
        keep = keep | ~visual  # only visual tokens may go; fillers go with the rows they equalise
        if st.live is not None:
            keep = keep & st.live
        if ctx.kept is not None:  # the method knows how many it keeps: the host sizes the batch without a read
            kept = [min(int(k), n) for k, n in zip(ctx.kept, st.visual_counts)]
        else:  # one read per pruning layer: the sizes of the compacted batch
            kept = (keep & visual).sum(1).tolist()
        if kept == st.visual_counts:
            return  # nothing goes
        live_counts = [n - v + k for n, v, k in zip(st.live_counts, st.visual_counts, kept)]
        st.visual_counts, st.live_counts = kept, live_counts
        alive = positions
        first = index if self.method.prune_at_scored_layer else index + 1
        self.stats.raw["visual_alive"][first] = OnRead(
            lambda a=alive, m=keep & visual: [row[r].tolist() for row, r in zip(a, m)])
        # Compacted where it takes effect: rows that keep fewer tokens are left-filled with copies of their first
        # kept token, masked out as keys, so every row has the same length and a batch gives the same tokens as
        # single runs.
        st.pending = (keep, max(live_counts), min(live_counts) != max(live_counts))

    def _sliced_kwargs(self, kwargs, batch):
        """Slice the kwargs every layer shares (mask, RoPE, position ids) to the alive positions, once per change."""
        st = self.state
        source = kwargs.get("position_embeddings")
        if st.sliced is not None and st.sliced[0] == st.version and st.sliced[1] == id(source):
            return {**kwargs, **st.sliced[2]}
        alive, live = st.alive, st.live
        out = {}
        if source is not None:
            out["position_embeddings"] = tuple(gather_rows(t, alive) for t in source)
        if kwargs.get("position_ids") is not None:
            out["position_ids"] = gather_rows(kwargs["position_ids"], alive)
        out["attention_mask"] = self._prefill_mask(kwargs.get("attention_mask"), alive, live, batch)
        st.sliced = (st.version, id(source), out)
        return {**kwargs, **out}

    def _prefill_mask(self, mask, alive, live, batch):
        fillers = self.state.fillers
        if mask is None:
            if not fillers:
                return None  # the sliced prompt is still causal and unpadded: SDPA keeps is_causal
            if _compat.attn_implementation(self.config).startswith("flash"):
                return live.long()
            causal = alive.unsqueeze(2) >= alive.unsqueeze(1)  # by original position
            return forbid_columns(causal.unsqueeze(1), ~live)
        if mask.dim() == 2:
            return forbid_columns(gather_rows(mask, alive), ~live)
        mask = mask.expand(batch, *mask.shape[1:]) if mask.shape[0] == 1 else mask
        rows = gather_rows(mask, alive, dim=2)
        return forbid_columns(gather_rows(rows, alive, dim=3), ~live)

    def _attention_keys(self, layer, hidden, kwargs):
        """The layer's normalised input and its keys (B, Hk, K, D) with RoPE, recomputed from the layer's input
        (norm, k projection, RoPE), so the model keeps running SDPA / FlashAttention and never needs
        ``output_attentions``. Made once per scoring, however many attention queries the method asks."""
        made = kwargs.get(_KEYS)
        if made is not None and made[0] is hidden:
            return made[1]
        attn = _compat.decoder_attention(layer)
        B, K, _ = hidden.shape
        u = attn.input_norm(hidden)
        k = attn.k_proj(u).view(B, K, -1, attn.head_dim).transpose(1, 2)
        if attn.k_norm is not None:  # Qwen3-style per-head norms
            k = attn.k_norm(k)
        cos, sin = (t.expand(B, *t.shape[1:]) for t in kwargs["position_embeddings"])
        keys = u, k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)
        kwargs[_KEYS] = (hidden, keys)
        return keys

    def _attention_queries(self, layer, u, kwargs, rows: torch.Tensor) -> torch.Tensor:
        """(B, Hq, R, D) queries of rows ``rows`` (B, R), with RoPE."""
        attn = _compat.decoder_attention(layer)
        B = u.shape[0]
        q = attn.q_proj(gather_rows(u, rows)).view(B, rows.shape[1], -1, attn.head_dim).transpose(1, 2)
        if attn.q_norm is not None:
            q = attn.q_norm(q)
        cos, sin = (gather_rows(t.expand(B, *t.shape[1:]), rows).unsqueeze(1) for t in kwargs["position_embeddings"])
        return q * cos + rotate_half(q) * sin

    def _attention_rows(self, layer, hidden, kwargs, rows: torch.Tensor) -> torch.Tensor:
        """Softmax attention of ``layer`` for query rows ``rows`` (B, R): (B, heads, R, K) in fp32."""
        u, k = self._attention_keys(layer, hidden, kwargs)
        q = self._attention_queries(layer, u, kwargs, rows)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * _compat.decoder_attention(layer).scaling
        allowed = self._allowed(kwargs.get("attention_mask"), rows, hidden.shape[1])
        scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)

    def _attention_received(self, layer, hidden, kwargs, rows: torch.Tensor, weights: torch.Tensor,
                            chunk: int = 512) -> torch.Tensor:
        """(B, K): the head-averaged attention each key receives from query rows ``rows`` (B, R) weighted by
        ``weights`` (B, R), without ever holding every row's probabilities (the scoring primitive's dispatch)."""
        u, k = self._attention_keys(layer, hidden, kwargs)
        scale = _compat.decoder_attention(layer).scaling
        mask = kwargs.get("attention_mask")
        out = None
        for start in range(0, rows.shape[1], chunk):
            part = rows[:, start : start + chunk]
            q = self._attention_queries(layer, u, kwargs, part)
            got = attention_received(q, k, weights[:, start : start + chunk], scale,
                                     **self._scoring_masks(mask, part), backend=self.backend)
            out = got if out is None else out + got
        return out

    def _allowed(self, mask, rows, K) -> torch.Tensor:
        """(B, R, K) keys each query row may attend to, as the layer's own attention sees them."""
        return allowed_keys(rows.shape[0], rows.shape[1], K, rows.device, **self._scoring_masks(mask, rows))

    def _scoring_masks(self, mask, rows) -> dict:
        """The keys query rows ``rows`` (B, R) may attend to, in the scoring kernel's terms: causal rows and valid
        keys (no (B, R, K) mask needed), or the rows of a 4-D mask."""
        B = rows.shape[0]
        if mask is not None and mask.dim() == 4:
            return {"allowed": gather_rows(mask_allows(mask.expand(B, *mask.shape[1:])[:, 0]), rows)}
        valid = None if mask is None else mask.bool().expand(B, -1)  # 2-D padding mask (FlashAttention layouts)
        if self.state.live is not None:
            valid = self.state.live if valid is None else valid & self.state.live
        return {"causal_rows": rows, "key_valid": valid}

    def _decode(self, index, args, kwargs):
        """Decode step: this layer's cache holds only the alive prefill tokens, so its mask columns must match. The
        mask of each distinct record is made once per step and shared by its layers."""
        record = self.decode_records[index] if index < len(self.decode_records) else None
        if record is None:
            return None
        mask = kwargs.get("attention_mask")
        hidden = args[0] if args else kwargs["hidden_states"]
        q = hidden.shape[1]
        if mask is None and not record.fillers and q == 1:
            return None  # SDPA without padding: no mask at q=1, the shorter cache is enough
        key = (id(record), id(mask))
        if key not in self.decode_masks:
            self.decode_masks[key] = self._decode_mask(record, mask, hidden.shape[0], q,
                                                       _compat.find_cache(kwargs).get_seq_length(index))
        kwargs["attention_mask"] = self.decode_masks[key]
        return args, kwargs

    def _decode_mask(self, record: Alive, mask, B: int, q: int, cached: int) -> torch.Tensor:
        alive, live = record.alive, record.live
        L0 = self.decode_slots
        K = alive.shape[1]
        if mask is None:
            tail = cached - K + q  # slots after the pruned prefill
            head = live[:, None, None, :].expand(B, 1, q, K)
            rows, cols = torch.arange(q, device=live.device), torch.arange(tail, device=live.device)
            causal = cols.view(1, tail) <= (tail - q + rows).view(q, 1)
            return torch.cat([head, causal.expand(B, 1, q, tail)], dim=-1)
        if mask.dim() == 2:
            head = gather_rows(mask[:, :L0], alive)
        else:
            m = mask[..., :L0].expand(B, *mask.shape[1:-1], L0)
            head = m.gather(3, alive[:, None, None, :].expand(B, m.shape[1], m.shape[2], K))
        if record.fillers:
            head = forbid_columns(head, ~live)
        return torch.cat([head, mask[..., L0:]], dim=-1)

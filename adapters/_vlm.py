"""Shared VLM machinery: shortening the prompt at the multimodal boundary, and dropping tokens between decoder
layers during prefill (the mechanism of ARCHITECTURE.md), for Llama-like HF decoders.

Both keep the host's own attention implementation (eager, SDPA, FlashAttention) and ``generate()`` untouched:
only the inputs of the LLM call and of each decoder layer are edited, per forward, through hooks.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from vtoken.adapters import _compat
from vtoken.adapters._ffn import DecodeFFN
from vtoken.kernels.attention import attention_received
from vtoken.kernels.attention.naive import allowed_keys
from vtoken.kernels.compaction import compact
from vtoken.methods.base import SUBLAYER_KINDS, LayerContext, SublayerContext, VisualTokenMethod


@dataclass
class VLMStats:
    """What the last prefill did. Lists are per image (``visual_tokens_in/kept``), per sample
    (``visual_tokens_llm``) or per decoder layer then per sample (``tokens_per_layer``)."""

    prefills: int = 0
    visual_tokens_in: list[int] = field(default_factory=list)
    visual_tokens_kept: list[int] = field(default_factory=list)
    kept_indices: list[torch.Tensor | None] = field(default_factory=list)
    visual_tokens_llm: list[int] = field(default_factory=list)
    tokens_per_layer: list[list[int]] = field(default_factory=list)
    visual_tokens_per_layer: list[list[int]] = field(default_factory=list)
    tokens_per_frame: list[list[int]] = field(default_factory=list)  # per item: kept tokens per frame (videos)
    selection_time_s: float = 0.0
    scoring_time_s: float = 0.0
    records: dict[int, dict] = field(default_factory=dict)
    # layer -> per sample, the LLM-input positions of the visual tokens still alive from that layer on
    visual_alive: dict[int, list[list[int]]] = field(default_factory=dict)
    vision: object = None  # stats of a method running inside the vision tower (token_clustering), last call
    notes: list[str] = field(default_factory=list)

    def reset(self) -> None:
        prefills = self.prefills
        self.__init__()
        self.prefills = prefills + 1


def timed(device: torch.device):
    """Wall time of a block, synchronising CUDA so the time belongs to the block and not to the next kernel."""

    class _Timer:
        elapsed = 0.0

        def __enter__(self):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.t0 = time.perf_counter()
            return self

        def __exit__(self, *exc):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.elapsed = time.perf_counter() - self.t0

    return _Timer()


# ------------------------------------------------------------------------------------------------------------
# Boundary: remove placeholder columns from the prompt
# ------------------------------------------------------------------------------------------------------------
class PromptEdit:
    """Columns removed from a (B, L) run of new tokens (a prompt, or a later turn on top of a cache), with rows
    re-filled on the left to a common length. ``col_map[b, j]`` is the input column of output column j, -1 for a
    filler (left padding of the shortened run)."""

    def __init__(self, drop: torch.Tensor):
        B, L = drop.shape
        device = drop.device
        keep = ~drop
        counts = keep.sum(1)
        self.length_in, self.length_out = L, int(counts.max())
        n_pad = self.length_out - counts
        cols = torch.where(keep, torch.arange(L, device=device), L).sort(dim=1).values[:, : self.length_out]
        slot = torch.arange(self.length_out, device=device) - n_pad.unsqueeze(1)  # < 0: new left padding
        self.col_map = torch.where(slot >= 0, cols.gather(1, slot.clamp(min=0)), -1)
        self.dropped_before = drop.long().cumsum(1) - drop.long()
        self.shift = drop.sum(1)  # (B,) tokens removed per row
        self.added_padding = bool((n_pad > 0).any())  # the longest row never gets any

    def gather(self, x: torch.Tensor, fill) -> torch.Tensor:
        """Apply the column map to a (B, L, ...) tensor; new padding columns get ``fill``."""
        return gather_columns(x, self.col_map, fill, dim=1)

    def position_ids(self, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        """Positions of the shortened run: a kept token moves down by the tokens dropped before it in the run."""
        if position_ids is None:
            if not self.added_padding:
                return None  # the host's default arange over the shorter prompt is already right
            B = self.col_map.shape[0]
            position_ids = torch.arange(self.length_in, device=self.col_map.device).expand(B, -1)
        shifted = position_ids - self.dropped_before.to(position_ids.device)
        return self.gather(shifted, 0)


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
    ids: torch.Tensor | None  # (B, columns) the caller's ids, to check that a continuation continues them
    method: str
    pruned: list | None = None  # in-LLM pruned prefill: per decoder layer (alive, live) or None
    pruned_slots: int = 0  # slots that prefill wrote (its LLM input length)
    rope_deltas: torch.Tensor | None = None  # M-RoPE hosts: (B, 1) offset of text positions after the prompt
    # per-row tensors (first dim = row) a method carries with the conversation, e.g. CoreMatching's decode neurons
    row_state: dict | None = None

    @staticmethod
    def of(cache) -> CacheLayout | None:
        return getattr(cache, LAYOUT_ATTR, None) if cache is not None else None

    @staticmethod
    def identity(batch: int, length: int, device, method: str) -> CacheLayout:
        """A cache written without vtoken (or without any change): slot i holds column i."""
        return CacheLayout(torch.empty(batch, 0, dtype=torch.long, device=device), length, length,
                           torch.zeros(batch, dtype=torch.long, device=device), None, method)

    @property
    def batch(self) -> int:
        return self.source.shape[0]

    def attach(self, cache) -> None:
        setattr(cache, LAYOUT_ATTR, self)

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
        pruned = None if self.pruned is None else [
            None if rec is None else tuple(t.repeat_interleave(n, 0) for t in rec) for rec in self.pruned]
        deltas = None if self.rope_deltas is None else self.rope_deltas.repeat_interleave(n, 0)
        rows = None if self.row_state is None else {k: t.repeat_interleave(n, 0) for k, t in self.row_state.items()}
        return dataclasses.replace(
            self, source=self.source.repeat_interleave(n, 0), shift=self.shift.repeat_interleave(n, 0),
            ids=None if self.ids is None else self.ids.repeat_interleave(n, 0), pruned=pruned, rope_deltas=deltas,
            row_state=rows)

    def extended(self, edit: PromptEdit | None, ids: torch.Tensor | None, length_in: int) -> CacheLayout:
        """The layout after a call that fed ``length_in`` new caller columns, shortened by ``edit`` if any."""
        joined = None if self.ids is None or ids is None else torch.cat([self.ids, ids.to(self.ids.device)], 1)
        if edit is None:
            return dataclasses.replace(self, columns=self.columns + length_in, slots=self.slots + length_in,
                                       ids=joined)
        new = torch.where(edit.col_map >= 0, edit.col_map + self.columns, -1)
        return dataclasses.replace(
            self, source=torch.cat([self.slot_columns(self.slots), new], dim=1), columns=self.columns + length_in,
            slots=self.slots + edit.length_out, shift=self.shift + edit.shift.to(self.shift.device), ids=joined)


# ------------------------------------------------------------------------------------------------------------
# In-LLM: drop tokens between decoder layers during prefill
# ------------------------------------------------------------------------------------------------------------
DECODE_NEURONS = "decode_neurons"  # CacheLayout.row_state key: (B, decode FFN layers, k) neurons per row
DECODE_LAYERS = "decode_layers"  # ... and (B, decode FFN layers): the layers they were chosen for


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def gather_rows(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``x`` gathered along ``dim`` by a (B, K) index; a batch-1 ``x`` is broadcast first."""
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


@dataclass
class TokenState:
    """Per prefill: which layer-0 positions are alive at the current layer, per sample."""

    visual: torch.Tensor  # (B, L0) at the LLM input
    valid: torch.Tensor  # (B, L0) real (non-padding) tokens
    alive: torch.Tensor | None = None  # (B, K) layer-0 positions at the current layer; None = all
    live: torch.Tensor | None = None  # (B, K) False for filler slots that only equalise row lengths
    pending: torch.Tensor | None = None  # (B, K) keep mask to apply at the next layer's input
    version: int = 0
    per_layer: list = field(default_factory=list)  # per layer: (alive, live) or None, reused by decode steps
    sliced: tuple | None = None  # (version, id(source), kwargs) cache of the sliced shared kwargs
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
    def begin_prefill(self, visual: torch.Tensor, valid: torch.Tensor) -> None:
        self.state = TokenState(visual=visual, valid=valid)
        self.mode = "prefill" if self.score_layers or self.observed else "idle"
        if self.ffn is not None:
            self.ffn.activate(None)

    def pruned_layers(self) -> list | None:
        """Per layer, the (alive, live) sets of the last prefill; None when it pruned nothing."""
        records = self.state.per_layer if self.state is not None else []
        return records if any(rec is not None for rec in records) else None

    def begin_decode(self, layout) -> None:
        """A call that continues a cache: layers that pruned its prefill hold fewer slots, so their masks shrink, and
        the conversation's decode neurons (if its prefill chose any) drive the sliced FFNs."""
        if layout is not None and layout.pruned is not None:
            self.mode, self.decode_records, self.decode_slots = "decode", layout.pruned, layout.pruned_slots
        else:
            self.mode = "idle"
        if self.ffn is not None:
            rows = layout.row_state if layout is not None and layout.row_state is not None else {}
            if DECODE_LAYERS in rows and tuple(rows[DECODE_LAYERS][0].tolist()) != self.ffn.indices:
                raise ValueError(
                    f"vtoken: this KV cache's decode neurons were chosen for layers {rows[DECODE_LAYERS][0].tolist()}"
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
        layers = torch.tensor(self.ffn.indices, device=neurons.device).expand(neurons.shape[0], -1)
        return {DECODE_NEURONS: neurons, DECODE_LAYERS: layers}

    def _zero_kv(self, cache, index: int, zero: torch.Tensor) -> None:
        """Zero this prefill's cached keys and values of layer ``index`` at LLM-input positions ``zero`` (B, L0)."""
        record = self.state.per_layer[index]
        if record is not None:  # the layer cached only the alive positions
            alive, live = record
            zero = gather_rows(zero, alive) & live
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
        valid, visual = self._current_sets(hidden.shape[0])
        if index in self.score_layers and bool(visual.any()):
            with timed(hidden.device) as t:
                self._score(index, layer, hidden, kwargs, valid, visual)
            self.stats.scoring_time_s += t.elapsed
            if self.method.prune_at_scored_layer and st.pending is not None:  # this layer already runs without them
                hidden = self._apply_pending(hidden)
                kwargs = self._sliced_kwargs(shared, hidden.shape[0])
                valid, visual = self._current_sets(hidden.shape[0])
        st.per_layer.append(None if st.alive is None else (st.alive, st.live))
        self.stats.tokens_per_layer.append(valid.sum(1).tolist())
        self.stats.visual_tokens_per_layer.append((visual & valid).sum(1).tolist())
        return (hidden, *args[1:]), kwargs

    def _apply_pending(self, hidden: torch.Tensor) -> torch.Tensor:
        """Move to the selection the last scoring made: the alive sets and the hidden states shrink together (one
        ragged-compaction launch on CUDA)."""
        st = self.state
        keep, st.pending = st.pending, None
        hidden, st.alive, st.live = compact(hidden, keep, st.alive, self.backend)
        st.version += 1
        return hidden

    def _current_sets(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.state
        if st.alive is None:
            return st.valid.expand(batch, -1), st.visual.expand(batch, -1)
        valid = gather_rows(st.valid, st.alive) & st.live
        return valid, gather_rows(st.visual, st.alive) & st.live

    def _positions(self, batch: int, length: int) -> torch.Tensor:
        """(B, L) LLM-input position of each row at the current layer."""
        st = self.state
        if st.alive is not None:
            return st.alive
        return torch.arange(length, device=st.valid.device).expand(batch, -1)

    def _make_observer(self, index: int, kind: str):
        def observe(module, args, kwargs, output):
            if self.mode != "prefill":
                return None
            x, y = _compat.module_io(args, kwargs, output)
            valid, visual = self._current_sets(x.shape[0])
            with timed(x.device) as t:
                self.method.observe(SublayerContext(
                    layer=index, num_layers=len(self.layers), kind=kind, input=x, output=y, valid=valid, visual=visual,
                    positions=self._positions(x.shape[0], x.shape[1]), n_positions=self.state.valid.shape[1],
                    state=self.state.scratch))
            self.stats.scoring_time_s += t.elapsed
            return None

        return observe

    def _score(self, index, layer, hidden, kwargs, valid, visual) -> None:
        st = self.state
        ctx = LayerContext(
            layer=index,
            num_layers=len(self.layers),
            hidden=hidden,
            valid=valid,
            visual=visual,
            n_visual_input=st.visual.sum(1),
            attention=lambda rows: self._attention_rows(layer, hidden, kwargs, rows),
            received=lambda rows, weights: self._attention_received(layer, hidden, kwargs, rows, weights),
            positions=self._positions(hidden.shape[0], hidden.shape[1]),
            state=st.scratch,
        )
        keep = self.method.prune(ctx)
        if ctx.record:
            self.stats.records[index] = dict(ctx.record)
        live = st.live if st.live is not None else torch.ones_like(keep)
        keep = (keep | ~visual) & live  # only visual tokens may go; old fillers are rebuilt below
        if bool(keep.all()):
            return
        alive = st.alive if st.alive is not None else torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        first = index if self.method.prune_at_scored_layer else index + 1
        self.stats.visual_alive[first] = [row[m].tolist() for row, m in zip(alive, keep & visual)]
        # Compacted where it takes effect: rows that keep fewer tokens are left-filled with copies of their first
        # kept token, masked out as keys, so every row has the same length and a batch gives the same tokens as
        # single runs.
        st.pending = keep

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
        fillers = not bool(live.all())
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
        ``output_attentions``."""
        attn = _compat.decoder_attention(layer)
        B, K, _ = hidden.shape
        u = attn.input_norm(hidden)
        k = attn.k_proj(u).view(B, K, -1, attn.head_dim).transpose(1, 2)
        if attn.k_norm is not None:  # Qwen3-style per-head norms
            k = attn.k_norm(k)
        cos, sin = (t.expand(B, *t.shape[1:]) for t in kwargs["position_embeddings"])
        return u, k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)

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
        """Decode step: this layer's cache holds only the alive prefill tokens, so its mask columns must match."""
        record = self.decode_records[index] if index < len(self.decode_records) else None
        if record is None:
            return None
        alive, live = record
        mask = kwargs.get("attention_mask")
        L0 = self.decode_slots
        hidden = args[0] if args else kwargs["hidden_states"]
        B, q = hidden.shape[:2]
        K = alive.shape[1]
        if mask is None:
            if bool(live.all()) and q == 1:
                return None  # SDPA without padding: no mask at q=1, the shorter cache is enough
            tail = _compat.find_cache(kwargs).get_seq_length(index) - K + q  # slots after the pruned prefill
            head = live[:, None, None, :].expand(B, 1, q, K)
            rows, cols = torch.arange(q, device=live.device), torch.arange(tail, device=live.device)
            causal = cols.view(1, tail) <= (tail - q + rows).view(q, 1)
            kwargs["attention_mask"] = torch.cat([head, causal.expand(B, 1, q, tail)], dim=-1)
            return args, kwargs
        if mask.dim() == 2:
            head = gather_rows(mask[:, :L0], alive)
        else:
            m = mask[..., :L0].expand(B, *mask.shape[1:-1], L0)
            head = m.gather(3, alive[:, None, None, :].expand(B, m.shape[1], m.shape[2], K))
        kwargs["attention_mask"] = torch.cat([forbid_columns(head, ~live), mask[..., L0:]], dim=-1)
        return args, kwargs

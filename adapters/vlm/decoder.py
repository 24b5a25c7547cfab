"""Dropping tokens between decoder layers during prefill (the in-LLM stage), and the decode steps that follow: the
``DecoderPruner`` of one model instance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from vtoken.adapters import _compat
from vtoken.adapters.vlm.cache import DECODE_LAYERS, DECODE_NEURONS
from vtoken.adapters.vlm.columns import blocked_value, forbid_columns, gather_rows, mask_allows
from vtoken.adapters.vlm.ffn import DecodeFFN
from vtoken.adapters.vlm.stats import OnRead, VLMStats
from vtoken.kernels.attention import attention_received
from vtoken.kernels.attention.naive import allowed_keys
from vtoken.kernels.compaction import compact
from vtoken.kernels.dispatch import inside_graph
from vtoken.methods.base import SUBLAYER_KINDS, LayerContext, SublayerContext, VisualTokenMethod

_KEYS = "_vtoken_scoring_keys"  # a scoring call's own kwargs copy keeps its recomputed keys here


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


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


def onto_pruned_slots(mask: torch.Tensor, alive: torch.Tensor, live: torch.Tensor, prefill: int,
                      fillers: bool) -> torch.Tensor:
    """A (B, h, q, C) mask over a dense layer's dynamic-cache slots, moved onto a pruned layer's: the ``prefill``
    slots the prompt wrote are gathered at the ``alive`` positions (B, K), filler slots (``~live``) forbidden, and
    every later slot moves down by the ``prefill - K`` that went (a static cache's: :class:`SlotMap`)."""
    B, h, q, C = mask.shape
    K = alive.shape[1]
    head = mask[..., :prefill].gather(3, alive[:, None, None, :].expand(B, h, q, K))
    if fillers:
        head = forbid_columns(head, ~live)
    return head if C == prefill else torch.cat([head, mask[..., prefill:]], dim=-1)


class SlotMap(NamedTuple):
    """Where a pruned layer's slots of a static cache (width W) read a dense mask's columns: its first K slots hold
    the alive positions, every later one the dense slot ``prefill - K`` further on, and its last ``prefill - K`` are
    never written. Made once per conversation, so that a decode step moves its mask with one gather and one fill:
    ``index`` (B, 1, 1, W) the dense slot behind each, ``blocked`` (B, 1, 1, W) its filler slots and the slots it
    never writes, ``open`` the rest."""

    index: torch.Tensor
    blocked: torch.Tensor
    open: torch.Tensor

    @classmethod
    def of(cls, record: Alive, prefill: int, width: int) -> SlotMap:
        alive, live = record.alive, record.live
        B, K = alive.shape
        later = torch.arange(prefill, prefill + width - K, device=alive.device)  # dense slots after the prompt
        index = torch.cat([alive, later.clamp(max=width - 1).expand(B, -1)], dim=1)
        blocked = torch.cat([~live, (later >= width).expand(B, -1)], dim=1)
        return cls(index[:, None, None, :], blocked[:, None, None, :], ~blocked[:, None, None, :])

    def moved(self, mask: torch.Tensor) -> torch.Tensor:
        """A (B or 1, h, q, W) dense mask onto these slots."""
        B, W = self.index.shape[0], self.index.shape[-1]
        if mask.shape[0] != B:
            mask = mask.expand(B, *mask.shape[1:])
        index = self.index if mask.shape[1:3] == (1, 1) else self.index.expand(B, *mask.shape[1:3], W)
        moved = mask.gather(3, index)
        if moved.dtype == torch.bool:
            return moved & self.open
        return moved.masked_fill(self.blocked, blocked_value(moved))


def record_groups(records: list) -> tuple[list, list]:
    """(per layer the index of its distinct record or None, the distinct records): the layers between two prunes
    hold the same alive sets, each in a record of its own."""
    groups, distinct, of_layer = [], {}, []
    for rec in records:
        if rec is not None and (id(rec.alive), id(rec.live)) not in distinct:
            distinct[id(rec.alive), id(rec.live)] = len(groups)
            groups.append(rec)
        of_layer.append(None if rec is None else distinct[id(rec.alive), id(rec.live)])
    return of_layer, groups


def layout_groups(layout) -> tuple[list, list]:
    """:func:`record_groups` of a cache layout's pruned records, made once per conversation: the layout carries them
    from step to step, so a decode step runs no loop over the layers for them."""
    made = layout.__dict__.get("_record_groups")
    if made is None or made[0] is not layout.pruned:
        made = layout.__dict__["_record_groups"] = (layout.pruned, record_groups(layout.pruned))
    return made[1]


def slot_maps(layout, width: int) -> list[SlotMap]:
    """The :class:`SlotMap` of each distinct pruned record of a cache's ``layout`` at a static cache's ``width``,
    made once per conversation (the prefill makes them; the layout carries them from step to step)."""
    made = layout.__dict__.get("_slot_maps")
    if made is None or made[0] != width:
        groups = layout_groups(layout)[1]
        made = layout.__dict__["_slot_maps"] = (width, [SlotMap.of(rec, layout.pruned_slots, width) for rec in groups])
    return made[1]


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
    bounded: bool = False  # the host counts are upper bounds: a decision inside a graph kept the width (``_score``)
    pending: tuple | None = None  # (keep mask, width, fillers) to apply at the next layer's input
    version: int = 0
    per_layer: list = field(default_factory=list)  # per layer: Alive or None, reused by decode steps
    sliced: tuple | None = None  # (version, source, kwargs) cache of the sliced shared kwargs
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
        self.final_norm = _compat.decoder_final_norm(decoder)
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
        self.decode_groups: list = []  # per layer: which distinct pruned record it holds (None: not pruned)
        self.decode_masks: dict = {}  # per step: the mask of each distinct record and layer type
        self.layer_kinds = tuple(getattr(self.config, "layer_types", None) or ("full_attention",) * n)
        self.decode_slots = 0
        self.static = False  # whether the current call's cache is a static one
        self.slot_maps: list[SlotMap] = []  # static decode steps: per distinct pruned record
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
    def begin_prefill(self, visual: torch.Tensor, valid: torch.Tensor, visual_counts: list[int] | None = None,
                      static: bool = False) -> None:
        """A prefill of the LLM input with ``visual`` and ``valid`` (B, L) masks; ``visual_counts``, the visual tokens
        of each row, when the host knows them (otherwise they are read once, here); ``static``: into a static cache,
        whose masks span all its slots."""
        if visual_counts is None:  # one read per prefill: every later size follows on the host
            visual_counts = visual.sum(1).tolist()
        B, L = visual.shape
        self.state = TokenState(visual=visual, valid=valid, visual_counts=list(visual_counts), live_counts=[L] * B,
                                input_visual_counts=list(visual_counts))
        self.mode = "prefill" if self.score_layers or self.observed else "idle"
        self.static = static
        if self.ffn is not None:
            self.ffn.activate(None)

    def pruned_layers(self) -> list | None:
        """Per layer, the :class:`Alive` sets of the last prefill; None when it pruned nothing."""
        records = self.state.per_layer if self.state is not None else []
        return records if any(rec is not None for rec in records) else None

    def begin_decode(self, layout, static_slots: int | None = None) -> None:
        """A call that continues a cache (``static_slots``: a static one's width): layers that pruned its prefill
        hold fewer slots, so their masks shrink, and the conversation's decode neurons (if its prefill chose any)
        drive the sliced FFNs."""
        self.static = static_slots is not None
        if layout is not None and layout.pruned is not None:
            self.mode, self.decode_records, self.decode_slots = "decode", layout.pruned, layout.pruned_slots
            self.decode_groups = layout_groups(layout)[0]
            if self.static:
                self.slot_maps = slot_maps(layout, static_slots)
        else:
            self.mode = "idle"
        # Emptied, not replaced, and keyed by host ints rather than tensor ids: compiled decode steps guard on neither
        # the dict's identity nor a mask's, so one graph serves every step.
        self.decode_masks.clear()
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
            keys=lambda: self._attention_keys(layer, hidden, kwargs, rope=False)[1],
            final_norm=self.final_norm,
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
        masked = ctx.kept is None and inside_graph()
        if ctx.kept is not None:  # the method knows how many it keeps: the host sizes the batch without a read
            kept = [min(int(k), n) for k, n in zip(ctx.kept, st.visual_counts)]
        elif masked:
            # A count that depends on the data, inside a graph (torch.compile, CUDA graphs): a read would split the
            # graph and a replay runs the shapes it was captured with. The later layers keep their width; the tokens
            # the decision drops become filler slots, masked out as keys, so every kept token computes what it would
            # after the removal. From here on the host's counts are upper bounds.
            kept, st.bounded = list(st.visual_counts), True
        else:  # one read per pruning layer: the sizes of the compacted batch
            kept = (keep & visual).sum(1).tolist()
        if kept == st.visual_counts and not masked:
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
        st.pending = (keep, max(live_counts), st.bounded or min(live_counts) != max(live_counts))

    def _sliced_kwargs(self, kwargs, batch):
        """Slice the kwargs every layer shares (mask, RoPE, position ids) to the alive positions, once per change."""
        st = self.state
        source = kwargs.get("position_embeddings")
        if st.sliced is not None and st.sliced[0] == st.version and st.sliced[1] is source:
            return {**kwargs, **st.sliced[2]}
        alive, live = st.alive, st.live
        out = {}
        if source is not None:
            out["position_embeddings"] = tuple(gather_rows(t, alive) for t in source)
        if kwargs.get("position_ids") is not None:
            out["position_ids"] = gather_rows(kwargs["position_ids"], alive)
        out["attention_mask"] = self._prefill_mask(kwargs.get("attention_mask"), alive, live, batch, kwargs)
        st.sliced = (st.version, source, out)
        return {**kwargs, **out}

    def _prefill_mask(self, mask, alive, live, batch, kwargs):
        fillers = self.state.fillers
        if mask is None:
            if not fillers:
                return None  # the sliced prompt is still causal and unpadded: SDPA keeps is_causal
            if _compat.attn_implementation(self.config).startswith("flash"):
                return live.long()
            if not self.static:
                causal = alive.unsqueeze(2) >= alive.unsqueeze(1)  # by original position
                return forbid_columns(causal.unsqueeze(1), ~live)
            # An unpadded prompt runs into a static cache without a mask (SDPA's causal rule from slot 0); fillers
            # need one over every slot: the dense prompt's, moved onto the pruned layer's slots below.
            prefill, width = self.state.valid.shape[1], _compat.static_slots(_compat.find_cache(kwargs))
            mask = torch.ones(prefill, width, dtype=torch.bool, device=alive.device).tril()[None, None]
        if mask.dim() == 2:
            return forbid_columns(gather_rows(mask, alive), ~live)
        mask = mask.expand(batch, *mask.shape[1:]) if mask.shape[0] == 1 else mask
        rows, prefill = gather_rows(mask, alive, dim=2), self.state.valid.shape[1]
        if self.static:  # the mask spans every slot of the cache
            return SlotMap.of(Alive(alive, live, self.state.fillers), prefill, mask.shape[-1]).moved(rows)
        return onto_pruned_slots(rows, alive, live, prefill, True)

    def _attention_keys(self, layer, hidden, kwargs, rope: bool = True):
        """The layer's normalised input and its keys (B, Hk, K, D) with RoPE (``rope=False``: before it),
        recomputed from the layer's input (norm, k projection, RoPE), so the model keeps running SDPA /
        FlashAttention and never needs ``output_attentions``. Made once per scoring, however many attention queries
        the method asks."""
        made = kwargs.get(_KEYS)
        if made is None or made[0] is not hidden:
            attn = _compat.decoder_attention(layer)
            B, K, _ = hidden.shape
            u = attn.input_norm(hidden)
            k = attn.k_proj(u).view(B, K, -1, attn.head_dim).transpose(1, 2)
            if attn.k_norm is not None:  # Qwen3-style per-head norms
                k = attn.k_norm(k)
            cos, sin = (t.expand(B, *t.shape[1:]) for t in kwargs["position_embeddings"])
            made = kwargs[_KEYS] = (hidden, u, k, k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1))
        return made[1], made[3] if rope else made[2]

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
                                     **self._scoring_masks(mask, part, k.shape[2]), backend=self.backend)
            out = got if out is None else out + got
        return out

    def _allowed(self, mask, rows, K) -> torch.Tensor:
        """(B, R, K) keys each query row may attend to, as the layer's own attention sees them."""
        return allowed_keys(rows.shape[0], rows.shape[1], K, rows.device, **self._scoring_masks(mask, rows, K))

    def _scoring_masks(self, mask, rows, keys: int) -> dict:
        """The keys query rows ``rows`` (B, R) may attend to, in the scoring kernel's terms: causal rows and valid
        keys (no (B, R, K) mask needed), or the rows of a 4-D mask."""
        B = rows.shape[0]
        if mask is not None and mask.dim() == 4:
            if mask.shape[-1] != keys:  # a static cache's mask spans every slot; the layer's input fills the first
                mask = mask[..., :keys]
            return {"allowed": gather_rows(mask_allows(mask.expand(B, *mask.shape[1:])[:, 0]), rows)}
        valid = None if mask is None else mask.bool().expand(B, -1)  # 2-D padding mask (FlashAttention layouts)
        if self.state.live is not None:
            valid = self.state.live if valid is None else valid & self.state.live
        return {"causal_rows": rows, "key_valid": valid}

    def _decode(self, index, args, kwargs):
        """Decode step: this layer's cache holds only the alive prefill tokens, so its mask columns must match. The
        mask of each distinct record is made once per step and shared by its layers. A static cache's step reads
        only the record's slot map, as wide as the cache, so a compiled step never sees how many tokens were kept
        (an adaptive count compiles nothing new)."""
        group = self.decode_groups[index] if index < len(self.decode_groups) else None
        if group is None:
            return None
        mask = kwargs.get("attention_mask")
        hidden = args[0] if args else kwargs["hidden_states"]
        q = hidden.shape[1]
        if not self.static and mask is None and not self.decode_records[index].fillers and q == 1:
            return None  # SDPA without padding: no mask at q=1, the shorter cache is enough
        key = (group, self.layer_kinds[index])  # generate() hands each layer type one mask
        if key not in self.decode_masks:
            self.decode_masks[key] = (self.slot_maps[group].moved(mask) if self.static else
                                      self._decode_mask(self.decode_records[index], mask, hidden.shape[0], q, kwargs,
                                                        index))
        kwargs["attention_mask"] = self.decode_masks[key]
        return args, kwargs

    def _decode_mask(self, record: Alive, mask, B: int, q: int, kwargs: dict, index: int) -> torch.Tensor:
        alive, live = record.alive, record.live
        L0 = self.decode_slots
        K = alive.shape[1]
        if mask is None:  # a dynamic cache (a static one's masks span its slots): its length is a host int
            tail = _compat.find_cache(kwargs).get_seq_length(index) - K + q  # slots after the pruned prefill
            head = live[:, None, None, :].expand(B, 1, q, K)
            rows, cols = torch.arange(q, device=live.device), torch.arange(tail, device=live.device)
            causal = cols.view(1, tail) <= (tail - q + rows).view(q, 1)
            return torch.cat([head, causal.expand(B, 1, q, tail)], dim=-1)
        if mask.dim() == 2:
            head = gather_rows(mask[:, :L0], alive)
            if record.fillers:
                head = forbid_columns(head, ~live)
            return torch.cat([head, mask[:, L0:]], dim=-1)
        return onto_pruned_slots(mask.expand(B, *mask.shape[1:]), alive, live, L0, record.fillers)

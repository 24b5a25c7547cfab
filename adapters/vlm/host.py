"""The host-independent half of a VLM adapter: one ``VLMPatch`` per model instance.

It owns every hook vtoken puts on a multimodal model: the shadowed ``get_<modality>_features`` that record what the
boundary stage needs, the pre- and post-hooks on the multimodal base model that reduce each image or video, drop
their surplus placeholders and keep a :class:`CacheLayout` on every cache, the ``prepare_inputs_for_generation``
wrapper that lets ``generate()`` continue a shortened conversation, and the :class:`DecoderPruner` of an in-LLM
method. A host adapter (``llava.py``, ``qwen_vl.py``) subclasses it and says *where* things are: its modalities,
how to encode them, the layout of each item's tokens (``ImageContext``), and its position ids.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vtoken.adapters import _compat
from vtoken.adapters.vlm.cache import CacheLayout
from vtoken.adapters.vlm.columns import PromptEdit, gather_columns, gather_rows, mask_valid, remap_mask
from vtoken.adapters.vlm.decoder import DecoderPruner, slot_maps
from vtoken.adapters.vlm.stats import OnRead, VLMStats
from vtoken.handle import Handle
from vtoken.methods.base import ImageContext, Reduction, TowerTokens, VisualTokenMethod, text_after_last_visual
from vtoken.timing import Stopwatch

STATIC_PRUNED = (
    "vtoken: {methods} prune(s) inside the LLM, which on a static cache needs 4-D masks over full-attention layers "
    "(attn_implementation 'sdpa' or 'eager', no sliding-window layers); got {what}. Use one of those, or the default "
    "DynamicCache"
)
STATIC_CONTINUED = (
    "vtoken: a static cache holds one conversation from its first token; continuing it with new images needs the "
    "default DynamicCache"
)
STATIC_FILLERS = (
    "vtoken: the rows of this static cache kept different numbers of tokens, so its slots no longer line up with "
    "the caller's columns; continue it through generate(), which vtoken hands a mask over the slots, or use the "
    "default DynamicCache"
)


# Dynamo prints the reason with each graph break it logs at these hooks, and in the error that fullgraph=True raises.
host_side = torch.compiler.disable(reason=(
    "vtoken keeps the bookkeeping around the language model's call (the prompt's layout, the KV cache's pruned slots) "
    "on the host, where it changes every step, so the whole VLM cannot compile as one graph (fullgraph=True); compile "
    "it without fullgraph, or compile the language model itself, which takes fullgraph=True with pruning included"))


@dataclass(frozen=True)
class Modality:
    """One kind of visual input of a host."""

    name: str  # its key in ``mm_encoder_outputs`` ("image", "video")
    features: str  # the base model's encoder method that generate() calls ("get_image_features")
    pixels: str  # the forward argument holding the raw input ("pixel_values")
    token_id: int  # its placeholder id in input_ids


@dataclass
class Item:
    """One image or video as the boundary stage sees it (found again by the identity of ``entry``)."""

    entry: torch.Tensor  # the features handed to generate(), padded to the item's placeholder count
    context: ImageContext
    n: int  # real tokens (a clustering tower may return fewer than the placeholders)
    companions: list[torch.Tensor]  # per-token tensors reduced alike (Qwen3-VL's deepstack features)


@dataclass
class _Call:
    """What one LLM call fed, for recording it on the cache afterwards."""

    layout: CacheLayout | None  # the cache's layout before the call (None: a fresh prefill)
    edit: PromptEdit | None  # how this call's new columns were shortened
    ids: torch.Tensor | None  # the caller's ids of those columns
    length_in: int  # caller columns the call added
    prefill: bool  # a fresh prefill with images: in-LLM pruning ran


@dataclass
class FeatureProvider:
    """Something in the vision path that makes the encoder return fewer tokens per item than the prompt holds
    placeholders for: a clustering tower (``token_clustering`` with ``reconstruct=False``), TokenFLEX's pooled
    projector. The patch zero-pads its features to the placeholder count for ``generate()``'s bookkeeping and
    shortens the prompt to the real count before the LLM runs."""

    name: str
    stats: Callable[[], object] = lambda: None  # what ``handle.stats.vision`` shows after a call
    # side of each view's square grid, for LLaVA-NeXT's packing (None: the vision tower's own patch grid)
    view_side: Callable[[], int] | None = None
    # the provider's own selection work in the vision path, counted in ``handle.stats.selection_time_s``
    selection: Stopwatch | None = None


class _ProvidedTokens(VisualTokenMethod):
    """Boundary stage that keeps every token a feature provider returns: the prompt only needs its placeholders
    shortened to the provider's count."""

    stages = ("boundary",)
    method_name = "feature provider"

    def __init__(self):
        self.keep = 1.0

    def reduce(self, features: torch.Tensor, ctx: ImageContext) -> Reduction:
        return Reduction(features, torch.arange(ctx.n, device=features.device))


class VLMPatch:
    """vtoken's hooks on one multimodal model instance, shared by at most one LLM-side method (``method``) and one
    feature provider (:class:`FeatureProvider`), in either order; the hooks stay while either is installed. With
    both, the method prunes the provider's tokens."""

    host: ClassVar[str] = ""
    token_kwargs: ClassVar[tuple[str, ...]] = ()  # (B, L) forward arguments that follow the prompt's columns
    _patches: ClassVar[weakref.WeakKeyDictionary]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._patches = weakref.WeakKeyDictionary()  # base model -> its patch, per host

    @classmethod
    def of(cls, model) -> VLMPatch:
        patch = cls._patches.get(model.model)
        if patch is None:
            patch = cls(model)
            cls._patches[model.model] = patch
        return patch

    # -- host hooks (subclasses) -----------------------------------------------------------------------------
    def modalities(self) -> list[Modality]:
        raise NotImplementedError

    def encode(self, modality: Modality, original, call: dict):
        """Run the encoder (``original(**call)``) and return (its output, one ImageContext per item)."""
        raise NotImplementedError

    def placeholder_counts(self, modality: Modality, features: list[torch.Tensor], call: dict) -> list[int]:
        """Placeholders the prompt holds per item (``call``: the encoder's arguments)."""
        return [f.shape[0] for f in features]

    def encoder_call(self, modality: Modality, kwargs: dict) -> dict:
        """The encoder's arguments from the multimodal forward's (when generate() did not encode beforehand)."""
        raise NotImplementedError

    def packed(self, modality: Modality, output):
        """The reduced encoder output in the form the host's forward reads (default: a list, one entry per item)."""
        return output

    def group_items(self, modality: Modality, kwargs: dict, encoded) -> tuple[Any, list[int] | None]:
        """The encoder output with each item the boundary stage reduces as one entry (default: as encoded), and the
        prompt row of each item where grouping learned it (else None). A host whose encoder sees parts of an item
        (InternVL's tiles) joins them here (:meth:`joined`), from the call's prompt."""
        return encoded, None

    def companions(self, out) -> list[list[torch.Tensor]]:
        """Per item, other per-token tensors of the encoder output that must be reduced alike."""
        return []

    def set_companions(self, out, companions: list[list[torch.Tensor]]) -> None:
        pass

    def complete_positions(self, module, kwargs: dict, layout: CacheLayout | None) -> None:
        """Fill in the caller's position ids where the host derives them from the full prompt (M-RoPE)."""

    def map_positions(self, kwargs: dict, layout: CacheLayout | None, edit: PromptEdit | None, length_in: int):
        """Positions of the call's new tokens in the cache (default: as if a processor had built the shorter
        prompt, see :func:`renumbered_positions`)."""
        return renumbered_positions(kwargs.get("position_ids"), layout, edit, length_in)

    def check_budget(self) -> None:
        pass

    def record(self, layout: CacheLayout) -> None:
        """Keep on a fresh prefill's cache layout what the host needs to continue it later."""

    # -- construction ---------------------------------------------------------------------------------------------
    def __init__(self, model):
        check_host_features(model.model)
        self.model, self.base, self.config = model, model.model, model.config
        self.llm, self.tower = _compat.decoder_of(self.base)
        self.method: VisualTokenMethod | None = None
        self.provider: FeatureProvider | None = None
        self.decoder: DecoderPruner | None = None
        self.stats = VLMStats()
        self.items: dict[int, Item] = {}
        self.groups: dict[tuple[int, ...], torch.Tensor] = {}  # entries -> their joined entry (see joined)
        self.call: _Call | None = None
        self.encoding = False
        self.base_signature = inspect.signature(self.base.forward)
        self.hooks = Handle(model, f"{self.host} hooks", None, self.host)  # the shared hooks' own undo list
        for modality in self.modalities():
            self.hooks.set_attr(self.base, modality.features, self.features_wrapper(modality))
        self.hooks.set_attr(model, "prepare_inputs_for_generation",
                            functools.update_wrapper(self.prepare_inputs(model.prepare_inputs_for_generation),
                                                     model.prepare_inputs_for_generation))
        # The bookkeeping around the LLM call keeps per-conversation state on the host (columns, slots, the cache's
        # layout), which changes every step: compiled code runs it as it is, outside the graph (a break before and
        # after the base model's call, never inside the decoder), instead of recompiling for each step's values.
        self.hooks.forward_pre_hook(self.base, host_side(self.before_llm), with_kwargs=True)
        self.hooks.forward_hook(self.base, host_side(self.after_llm), with_kwargs=True)
        self.hooks.forward_pre_hook(model, self.reject_labels, with_kwargs=True)

    # -- users ------------------------------------------------------------------------------------------------------
    @classmethod
    def install(cls, model, method: VisualTokenMethod, handle: Handle) -> None:
        """A host's installer of its boundary and in-LLM stages (``register_host(installers=...)``): the method on this
        instance's shared patch."""
        cls.of(model).attach_method(method, handle)

    def attach_method(self, method: VisualTokenMethod, handle: Handle) -> None:
        self.claim(handle, "vtoken.vlm_tokens")
        handle.on_remove(self.detach_method)
        self.method = method
        handle.stats = self.stats
        self.check_budget()
        layers = len(self.llm.layers)
        if method.score_layers(layers) or method.observed_sublayers(layers):
            self.decoder = DecoderPruner(self.llm, method, self.stats, handle)

    def attach_provider(self, provider: FeatureProvider, handle: Handle) -> None:
        self.claim(handle, "vtoken.vlm_tower")
        handle.on_remove(self.detach_provider)
        self.provider = provider
        handle.stats = self.stats

    def claim(self, handle: Handle, slot: str) -> None:
        try:
            handle.claim(self.base, slot)
        except BaseException:
            self.release()  # a patch created for this user alone must not outlive the failure
            raise

    def detach_method(self) -> None:
        self.method, self.decoder = None, None
        self.release()

    def detach_provider(self) -> None:
        self.provider = None
        self.release()

    def release(self) -> None:
        if self.method is None and self.provider is None:
            type(self)._patches.pop(self.base, None)
            self.hooks.remove()

    def boundary_method(self) -> VisualTokenMethod | None:
        if self.method is not None and self.method.boundary:
            return self.method
        return _ProvidedTokens() if self.provider is not None else None

    def method_names(self) -> str:
        names = [m for m in (self.method and self.method.method_name, self.provider and self.provider.name) if m]
        return " + ".join(map(repr, names))

    def reject_labels(self, module, args, kwargs):
        if kwargs.get("labels") is not None:
            raise ValueError(
                f"labels are not supported while {self.method_names()} is applied: pruning shortens the "
                "sequence the logits are computed on. Remove the patch for training, or compute the loss from the "
                "returned logits (text tokens keep their order at the end of each row)."
            )

    # -- boundary stage ----------------------------------------------------------------------------------------
    def features_wrapper(self, modality: Modality):
        original = getattr(self.base, modality.features)

        def get_features(*args, **kwargs):
            if self.boundary_method() is None or self.encoding:  # Qwen3-VL encodes videos through its image path
                return original(*args, **kwargs)
            self.encoding = True
            try:
                return self.features(modality, original, *args, **kwargs)
            finally:
                self.encoding = False

        return functools.update_wrapper(get_features, original)  # generate() reads its signature

    def features(self, modality: Modality, original, *args, **kwargs):
        """The original encoder call plus what the boundary stage needs later, per item.

        Features come back at full placeholder length (a feature provider's shorter output is zero-padded), so
        ``generate()``'s own bookkeeping, which splits and repeats features per sample by matching them to
        placeholder counts (beam search, ``num_return_sequences``), still holds; the reduction happens where the
        prompt is shortened, in :meth:`before_llm`. Repeated entries are the same tensors, found again by identity.
        """
        bound = inspect.signature(original).bind(*args, **kwargs)
        call = dict(bound.arguments)
        call.update(call.pop("kwargs", {}))
        out, contexts = self.encode(modality, original, call)
        features = list(out.pooler_output)
        companions = self.companions(out) or [[] for _ in features]
        self.items = {k: v for k, v in self.items.items() if v.context.modality != modality.name}
        self.groups = {k: v for k, v in self.groups.items() if id(v) in self.items}
        full = []
        for f, ctx, m, extra in zip(features, contexts, self.placeholder_counts(modality, features, call), companions):
            ctx.modality = modality.name
            entry = f if f.shape[0] >= m else torch.cat([f, f.new_zeros(m - f.shape[0], f.shape[1])])
            self.items[id(entry)] = Item(entry, ctx, f.shape[0], extra)
            full.append(entry)
        out.pooler_output = full
        return out

    def joined(self, entries: list[torch.Tensor]) -> torch.Tensor:
        """One item made of consecutive encoded entries (an image's tiles): their tokens in order, their grids one
        after another. The same entries give the same joined entry, so generate()'s repeats of an image (beams,
        sequences) are still found again by identity and reduced once."""
        if len(entries) == 1:
            return entries[0]
        key = tuple(map(id, entries))
        if key not in self.groups:
            items = [self.items[k] for k in key]
            entry = torch.cat([item.entry for item in items])
            self.items[id(entry)] = Item(entry, joined_context([item.context for item in items]), entry.shape[0], [])
            self.groups[key] = entry
        return self.groups[key]

    def reduce_items(self, modality: Modality, encoded):
        """The boundary stage on the features the LLM is about to get (one entry per item, maybe repeated)."""
        entries = list(encoded.pooler_output)
        if any(id(e) not in self.items for e in entries):
            raise ValueError(
                f"vtoken: precomputed {modality.name} features (mm_encoder_outputs) must come from this patched "
                f"model's {modality.features}, so the boundary stage can prune them consistently"
            )
        unique = list({id(e): e for e in entries}.values())  # generate() repeats items per beam / sequence
        method = self.boundary_method()
        with self.stats.selection(entries[0].device):
            items = [self.items[id(e)] for e in unique]
            done = dict(zip(map(id, unique), method.reduce_batch([(i.entry[: i.n], i.context) for i in items])))
        reductions = [done[id(e)] for e in entries]
        raw = self.stats.raw  # what needs the device is read when a user looks
        raw["visual_tokens_in"] += [self.items[id(e)].n for e in entries]
        raw["visual_tokens_kept"] += [r.features.shape[0] for r in reductions]
        raw["kept_indices"] += [None if r.kept is None else OnRead(r.kept.cpu) for r in reductions]
        raw["tokens_per_frame"] += [OnRead(functools.partial(frame_counts, self.items[id(e)].context, r))
                                    for e, r in zip(entries, reductions)]
        reduced = copy.copy(encoded)  # generate() may pass the same features again (use_cache=False)
        reduced.pooler_output = [r.features for r in reductions]
        companions = [self.items[id(e)].companions for e in entries]
        if any(companions):
            self.set_companions(reduced, [[reduce_alike(method, c, r, self.items[id(e)])
                                           for c in extra] for e, r, extra in zip(entries, reductions, companions)])
        return reduced, [(e.shape[0], r.features.shape[0], r.places()) for e, r in zip(entries, reductions)]

    def attach_instructions(self, kwargs, present: list[Modality], outputs: dict, rows: dict[str, list[int]]) -> None:
        """Give every item's context its prompt row's instruction (see ``ImageContext.instruction``), for a boundary
        method conditioned on it. Device ops only: the rows were counted with the prompt's layout."""
        cache = {}

        def instruction(row: int) -> tuple[torch.Tensor, torch.Tensor]:
            if "embeds" not in cache:
                embeds = kwargs.get("inputs_embeds")
                if embeds is None:
                    embeds = self.base.get_input_embeddings()(kwargs["input_ids"])
                cache["embeds"], cache["mask"] = embeds, text_after_last_visual(*self.visual_and_valid(kwargs))
            if row not in cache:  # the same tensors for every item of a row, so a method can tell rows apart
                cache[row] = cache["embeds"][row], cache["mask"][row]
            return cache[row]

        for modality in present:
            for entry, row in zip(outputs[modality.name].pooler_output, rows[modality.name]):
                self.items[id(entry)].context.instruction = functools.partial(instruction, row)

    def visual_and_valid(self, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(visual, valid) (B, L) of a call: the placeholders of every modality, and the real (non-padding) columns."""
        placeholders = None
        for modality in self.modalities():
            mask = self.placeholder_mask(kwargs, modality)
            placeholders = mask if placeholders is None else placeholders | mask
        # a static cache takes images only in its first call, whose tokens are the first of the slots its masks span
        first = _compat.is_static_cache(_compat.find_cache(kwargs))
        return placeholders, mask_valid(kwargs.get("attention_mask"), placeholders.shape, placeholders.device, first)

    def placeholder_mask(self, kwargs, modality: Modality) -> torch.Tensor:
        ids = kwargs.get("input_ids")
        if ids is not None:
            return ids == modality.token_id
        embeds = kwargs["inputs_embeds"]
        token = self.base.get_input_embeddings()(torch.tensor(modality.token_id, device=embeds.device))
        return (embeds == token.to(embeds.dtype)).all(-1)

    def rows_of_items(self, kwargs, counts: dict[str, list[int]],
                      known: dict[str, list[int] | None] | None = None) -> dict[str, list[int]]:
        """The row of every item of each modality (``counts[modality]``: each item's placeholders, in order), unless
        ``known`` gives them (see :meth:`group_items`).

        One row holds every item. Several rows take the items in order, each as many as its placeholders hold: the
        one read of the device a boundary reduction of a batch needs (the prompt's layout is only in its ids).
        """
        B = (kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[0]
        if B == 1:
            return {name: [0] * len(n) for name, n in counts.items()}
        out = {name: rows for name, rows in (known or {}).items() if rows is not None}
        names = [name for name in counts if name not in out]
        # the one read: placeholders per row and modality (none when grouping read the rows with the items)
        held_per_row = torch.stack([self.placeholder_mask(kwargs, self.modality(name)).sum(1)
                                    for name in names]).tolist() if names else []
        for name, held in zip(names, held_per_row):
            rows, item = [], 0
            for row, want in enumerate(held):
                while want > 0 and item < len(counts[name]):
                    want -= counts[name][item]
                    rows.append(row)
                    item += 1
                if want != 0:
                    break
            if item != len(counts[name]) or want != 0 or len(rows) != len(counts[name]):
                raise ValueError(
                    f"{name.capitalize()} features and {name} tokens do not match: the rows hold {held} {name} tokens, "
                    f"the inputs give {len(counts[name])} {name}s of {counts[name]} tokens. When a turn continues a "
                    f"KV cache, pass {self.modality(name).pixels} for the new tokens' {name}s only.")
            out[name] = rows
        return {name: out[name] for name in counts}

    def modality(self, name: str) -> Modality:
        return next(m for m in self.modalities() if m.name == name)

    def shorten_prompt(self, kwargs, kept: dict[str, list[tuple[int, int, torch.Tensor | None]]],
                       rows: dict[str, list[int]]) -> tuple[PromptEdit | None, list[int]]:
        """Drop the placeholders of the tokens the boundary stage removed, item by item, for every modality; return
        the edit and the visual tokens each row keeps.

        ``kept[modality]`` holds, per item, its placeholder count, the tokens it keeps, and which input tokens'
        placeholders stay (so hosts that keep original positions give each kept token its own); None keeps the
        first ones. ``rows[modality]``: each item's row. Every size is counted on the host; the device only builds
        the masks, so shortening costs no read of the device.
        """
        tokens = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        B, L = tokens.shape[:2]
        dropped, visual = [0] * B, [0] * B
        keep = None
        for modality in self.modalities():
            if modality.name not in kept:
                continue
            items = kept[modality.name]
            for (n, count, _), row in zip(items, rows[modality.name]):
                dropped[row] += n - count
                visual[row] += count
            if all(count == n for n, count, _ in items):
                continue
            placeholders = self.placeholder_mask(kwargs, modality).flatten()
            total = sum(n for n, _, _ in items)
            # every placeholder's column in row-major order (if the prompt holds fewer than the items need, the rest
            # read column 0, which no reduction drops: the model's own check then reports the mismatch)
            where = torch.nonzero_static(placeholders, size=total, fill_value=0).squeeze(1)
            ranks, start = [], 0
            for n, count, places in items:
                if count:
                    ranks.append(torch.arange(start, start + count, device=where.device) if places is None
                                 else places.to(where.device) + start)
                start += n
            kept_columns = where[torch.cat(ranks)] if len(ranks) > 1 else where[ranks[0]]
            stays = (~placeholders).index_fill_(0, kept_columns, True).view(B, L)
            keep = stays if keep is None else keep & stays
        if keep is None:
            return None, visual
        edit = PromptEdit(keep, kept_counts=[L - d for d in dropped])
        if kwargs.get("input_ids") is not None:
            pad = self.config.get_text_config().pad_token_id
            kwargs["input_ids"] = edit.gather(kwargs["input_ids"], 0 if pad is None else pad)
        if kwargs.get("inputs_embeds") is not None:
            kwargs["inputs_embeds"] = edit.gather(kwargs["inputs_embeds"], 0)
        for name in self.token_kwargs:
            if kwargs.get(name) is not None:
                kwargs[name] = edit.gather(kwargs[name], 0)
        return edit, visual

    # -- the LLM call ------------------------------------------------------------------------------------------
    def before_llm(self, module, args, kwargs):
        if args:  # some hosts pass input_ids positionally
            kwargs = {**dict(zip(self.base_signature.parameters, args)), **kwargs}
        self.call = None
        cache = _compat.find_cache(kwargs)
        encoded = kwargs.get(_compat.ENCODER_OUTPUTS) or {}
        present = [m for m in self.modalities() if encoded.get(m.name) is not None
                   or (kwargs.get(m.pixels) is not None and kwargs[m.pixels].numel() > 0)]
        boundary = self.boundary_method()
        static = _compat.is_static_cache(cache)
        if present and static and self.decoder is not None:
            self.check_static_pruning(cache)
        layout = self.layout_of(cache, kwargs, bool(present))
        if layout is not None and static:
            if present:
                raise ValueError(STATIC_CONTINUED)
            if layout.fillers and not layout.__dict__.pop("_slot_mask_given", False):
                raise ValueError(STATIC_FILLERS)
        elif layout is not None:
            self.skip_cached(kwargs, layout, cache)
        tokens = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        length_in = tokens.shape[1]
        ids = kwargs.get("input_ids")
        if not present:
            if layout is not None and static:
                self.shift_positions(kwargs, layout, length_in)
            elif layout is not None:
                self.map_text(kwargs, layout, length_in)
            if self.decoder is not None:
                self.decoder.begin_decode(layout, _compat.static_slots(cache) if static else None)
            self.call = _Call(layout, None, ids, length_in, prefill=False)
            return (), kwargs

        self.stats.reset()
        if self.provider is not None and self.provider.selection is not None:
            self.stats.selection.take(self.provider.selection)  # it ran in the encoder call, before this reset
        self.complete_positions(module, kwargs, layout)
        edit, visual_counts = None, None
        outputs = dict(kwargs.get(_compat.ENCODER_OUTPUTS) or {})
        if boundary is not None:
            known = {}
            for modality in present:
                if outputs.get(modality.name) is None:
                    outputs[modality.name] = getattr(module, modality.features)(**self.encoder_call(modality, kwargs))
                encoded = outputs[modality.name]
                outputs[modality.name], known[modality.name] = self.group_items(modality, kwargs, encoded)
                if self.provider is not None:
                    self.stats.vision = self.provider.stats()
            rows = self.rows_of_items(kwargs, {m.name: [e.shape[0] for e in outputs[m.name].pooler_output]
                                               for m in present}, known)
            if boundary.conditioned:
                self.attach_instructions(kwargs, present, outputs, rows)
            kept = {}
            for modality in present:
                reduced, kept[modality.name] = self.reduce_items(modality, outputs[modality.name])
                outputs[modality.name] = self.packed(modality, reduced)
                kwargs[modality.pixels] = None
            for item in self.items.values():
                item.context.instruction = None  # this call's prompt is not kept alive
            kwargs[_compat.ENCODER_OUTPUTS] = outputs
            edit, visual_counts = self.shorten_prompt(kwargs, kept, rows)
        elif self.decoder is not None and all(outputs.get(m.name) is not None for m in present):
            counts = {m.name: [f.shape[0] for f in outputs[m.name].pooler_output] for m in present}
            rows = self.rows_of_items(kwargs, counts)
            batch = (kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[0]
            visual_counts = [0] * batch
            for name, item_rows in rows.items():
                for n, row in zip(counts[name], item_rows):
                    visual_counts[row] += n
        self.map_call(kwargs, layout, edit, length_in)
        fresh = layout is None
        llm_input = dict(kwargs)  # what the LLM gets, for the sets below (made when needed)

        sets = functools.partial(self.visual_and_valid, llm_input)  # (visual, valid) of the LLM input

        def visual_per_row() -> list[int]:
            visual, valid = sets()
            return (visual & valid).sum(1).tolist()

        self.stats.visual_tokens_llm = OnRead(visual_per_row)
        if self.decoder is not None and fresh:
            self.decoder.begin_prefill(*sets(), visual_counts, static)
        else:  # nothing changes inside the decoder: every layer sees the (possibly shortened) new tokens
            if self.decoder is not None:
                note = "in-LLM pruning skipped for images that continue a KV cache (only a prefill is pruned)"
                self.stats.notes.append(note)
                warnings.warn(f"vtoken: {note}", stacklevel=2)
                self.decoder.begin_decode(layout)  # a dynamic cache: images on a written static one were refused
            layers = len(self.llm.layers)
            self.stats.tokens_per_layer = OnRead(lambda: [sets()[1].sum(1).tolist()] * layers)
            self.stats.visual_tokens_per_layer = OnRead(lambda: [visual_per_row()] * layers)
        self.call = _Call(layout, edit, ids, length_in, prefill=fresh)
        return (), kwargs

    def check_static_pruning(self, cache) -> None:
        """A layer pruned inside the LLM fills fewer of a static cache's slots than the masks generate() builds
        span; the decoder moves 4-D masks onto its slots. A sliding-window layer rolls its slots at the dense count."""
        attn = _compat.attn_implementation(self.decoder.config)
        sliding = _compat.sliding_cache_layers(cache)
        if attn not in ("sdpa", "eager") or sliding:
            what = f"attn_implementation {attn!r}" if not sliding else f"sliding-window layers {sliding}"
            raise ValueError(STATIC_PRUNED.format(methods=self.method_names(), what=what))

    # -- the cache: continuing what an earlier call wrote ---------------------------------------------------------
    def layout_of(self, cache, kwargs, images: bool) -> CacheLayout | None:
        """The layout of the cache this call continues; None for a fresh prefill (no cache, or an empty one) and for
        text on a cache vtoken did not change (the host's own bookkeeping is right there)."""
        if cache is None:
            return None
        layout = CacheLayout.of(cache)
        if not _compat.is_dynamic_cache(cache):  # its length lives on the device: its layout says what it holds
            return layout
        if cache.get_seq_length() == 0:
            return None
        tokens = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        if layout is None and not images:
            return None
        if layout is None:  # new images on a cache written without vtoken's changes: slot i is column i
            layout = CacheLayout.identity(tokens.shape[0], int(cache.get_seq_length()), tokens.device,
                                          self.method_names())
        if layout.pruned is not None and self.decoder is None:
            raise ValueError(
                f"vtoken: this KV cache was pruned inside the LLM by {layout.method}, so its layers hold different "
                f"lengths; continue it while that method is applied (now: {self.method_names()})"
            )
        return layout.expand(tokens.shape[0])

    @staticmethod
    def prepare_inputs(original):
        """generate() feeds a continued conversation from where the cache's slot count says; vtoken's shortened
        earlier turns hold fewer slots than columns, so the cut moves to the first column the cache does not hold.

        generate()'s padding mask addresses the caller's columns; on a shortened cache it is moved onto the slots
        here (``slot_mask``). A static cache needs it before generate() builds its 4-D masks from it; a dynamic one
        leaves it with the layout, and a text call that gets this very mask takes it instead of remapping."""

        def prepare_inputs_for_generation(input_ids, *args, **kwargs):
            unseen = kwargs.get(_compat.GENERATE_UNSEEN)
            cache = _compat.find_cache(kwargs)
            layout = CacheLayout.of(cache)
            tokens = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else input_ids
            if layout is not None and unseen == tokens.shape[1]:  # a new generation on a reused (static) cache
                CacheLayout.detach(cache)
                layout = None
            if layout is not None and unseen is not None and layout.columns != layout.slots:
                if unseen == tokens.shape[1] - layout.slots:
                    kwargs[_compat.GENERATE_UNSEEN] = tokens.shape[1] - layout.columns
                    check_continues(layout, input_ids if tokens is input_ids else None)
            mask = kwargs.get("attention_mask")
            if (layout is not None and (layout.fillers or layout.columns != layout.slots)
                    and mask is not None and mask.dim() == 2 and mask.shape[0] == layout.batch):
                if not _compat.is_dynamic_cache(cache):
                    if layout.fillers:  # without fillers a slot lines up with its column in every row already
                        kwargs["attention_mask"] = slot_mask(layout, mask)
                        layout.__dict__["_slot_mask_given"] = True
                else:
                    layout.__dict__["_slot_mask_for"] = (mask, slot_mask(layout, mask))
            return original(input_ids, *args, **kwargs)

        return prepare_inputs_for_generation

    def skip_cached(self, kwargs, layout: CacheLayout, cache) -> None:
        """Drop the leading new tokens the cache already holds.

        generate() cuts a continued conversation where the cache's slot count says, which is too early when
        vtoken shortened earlier turns; the caller's mask (its columns cover the whole conversation) tells where
        the new columns start.
        """
        if int(cache.get_seq_length()) != layout.slots:
            raise ValueError(
                f"vtoken: this KV cache holds {int(cache.get_seq_length())} slots but {layout.slots} were written "
                "through the patched model; a cache edited outside generate()/forward (cropped, as assisted "
                "decoding does) cannot be continued. Re-run the conversation from its start instead."
            )
        mask = kwargs.get("attention_mask")
        tokens = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        if mask is None:
            return
        trim = tokens.shape[1] - (mask.shape[-1] - layout.columns)
        if trim < 0:
            raise ValueError(
                f"vtoken: the attention mask covers {mask.shape[-1]} columns and the KV cache holds {layout.columns} "
                f"of them, so {mask.shape[-1] - layout.columns} new tokens were expected; got {tokens.shape[1]}"
            )
        if trim == 0:
            return
        ids = kwargs.get("input_ids")
        check_continues(layout, None if ids is None else ids[:, :trim], tail=True)
        for key in ("input_ids", "inputs_embeds", *self.token_kwargs):
            if kwargs.get(key) is not None:
                kwargs[key] = kwargs[key][:, trim:]
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"][..., trim:]
        if mask.dim() == 4:
            kwargs["attention_mask"] = mask[:, :, trim:]

    def map_text(self, kwargs, layout: CacheLayout, length_in: int) -> None:
        """Text that continues a shortened cache (every decode step). Without a mask and without filler slots, or with
        the mask generate() got moved onto the slots (``prepare_inputs``), the slots are the caller's columns moved
        down by each row's shift: the positions alone move (one subtraction, or none when the model derives them from
        the cache), and nothing is read from the device."""
        given = layout.__dict__.pop("_slot_mask_for", None)
        if given is not None and kwargs.get("attention_mask") is given[0]:
            kwargs["attention_mask"] = given[1]
        elif kwargs.get("attention_mask") is not None or layout.fillers:
            self.map_call(kwargs, layout, None, length_in)
            return
        self.shift_positions(kwargs, layout, length_in)

    def shift_positions(self, kwargs, layout: CacheLayout, length_in: int) -> None:
        """Text whose mask already addresses the slots: only the positions move down by each row's shift, one op.
        On a static cache (generate()'s decode steps with ``cache_implementation="static"``) generate() built the
        step's 4-D mask from the cache's own length, which counts the shortened prompt's slots, and from the slots'
        own padding when rows kept different numbers of tokens (``slot_mask``): every shape fixed, as CUDA graphs
        need."""
        positions = self.text_positions(kwargs, layout, length_in)
        if positions is None and layout.fillers:  # the model's default counts slots alike in every row
            positions = self.map_positions(kwargs, layout, None, length_in)
        if positions is not None:
            kwargs["position_ids"] = positions

    def text_positions(self, kwargs, layout: CacheLayout, length_in: int):
        """Positions of new text tokens on a shortened cache without fillers (None: the model's own default, which
        counts the cache's slots: the renumbered positions)."""
        positions = kwargs.get("position_ids")
        return None if positions is None else renumbered_positions(positions, layout, None, length_in)

    def map_call(self, kwargs, layout: CacheLayout | None, edit: PromptEdit | None, length_in: int) -> None:
        """Move the call's mask and positions from the caller's columns to the cache's slots."""
        if layout is None and edit is None:
            return
        mask = kwargs.get("attention_mask")
        fillers = (layout is not None and layout.fillers) or (edit is not None and edit.added_padding)
        if mask is not None or fillers:
            B = edit.col_map.shape[0] if edit is not None else layout.batch
            device = edit.col_map.device if edit is not None else layout.source.device
            base = layout.columns if layout is not None else 0
            new = torch.arange(length_in, device=device).expand(B, -1)
            rows = edit.col_map if edit is not None else new
            cols = torch.where(rows >= 0, rows + base, -1) if fillers else rows + base
            if layout is not None:
                cols = torch.cat([layout.slot_columns(layout.slots), cols], dim=1)
            if mask is None:  # filler slots must be masked out
                mask = torch.ones(B, base + length_in, dtype=torch.long, device=device)

            def remapped(mask: torch.Tensor) -> torch.Tensor:
                slots = cols
                if mask.dim() == 4 and mask.shape[-1] > base + length_in:
                    # a static cache's mask spans all its slots: its later columns stay as they are, shifted left,
                    # and the slots the shortened prompt leaves empty at the end are blocked
                    total = mask.shape[-1]
                    tail = torch.arange(base + length_in, total, device=device).expand(B, -1)
                    empty = torch.full((B, total - cols.shape[1] - tail.shape[1]), -1, device=device)
                    slots = torch.cat([cols, tail, empty], dim=1)
                return remap_mask(mask, rows, slots, edit is not None and edit.added_padding)

            # generate() hands a decoder with several layer types (Qwen2's full and sliding attention) one mask each
            kwargs["attention_mask"] = ({kind: m if m is None else remapped(m) for kind, m in mask.items()}
                                        if isinstance(mask, dict)
                                        else remapped(mask))
        kwargs["position_ids"] = self.map_positions(kwargs, layout, edit, length_in)

    def after_llm(self, module, args, kwargs, output):
        call, self.call = self.call, None
        cache = _compat.find_cache(output)
        row_state = None
        if self.decoder is not None:
            if call is not None and call.prefill and cache is not None:
                row_state = self.decoder.end_prefill(cache)
            self.decoder.idle()
        if call is None or cache is None:
            return output
        pruned = self.decoder.pruned_layers() if self.decoder is not None and call.prefill else None
        layout = call.layout
        if layout is None:
            if call.edit is None and pruned is None and row_state is None:
                return output  # nothing changed: slot i is column i
            if call.edit is not None:
                layout = CacheLayout.of_prefill(call.edit, call.ids, self.method_names())
            else:
                some = pruned[-1].alive if pruned is not None else next(iter(row_state.values()))
                layout = CacheLayout.identity(some.shape[0], 0, some.device, self.method_names())
                layout.ids = None if call.ids is None else ()
                layout = layout.extended(None, call.ids, call.length_in)
            self.record(layout)
        else:
            layout = layout.extended(call.edit, call.ids, call.length_in)
        if pruned is not None:
            layout.pruned, layout.pruned_slots = pruned, layout.slots
            if _compat.is_static_cache(cache):  # the prefill pays for what every decode step reads
                slot_maps(layout, _compat.static_slots(cache))
        if row_state is not None:
            layout.row_state = row_state
        layout.attach(cache)
        return output


def check_host_features(base) -> None:
    """Refuse a transformers release that lacks what the adapters rely on, rather than run silently wrong."""
    if not _compat.accepts_encoder_outputs(base):
        import transformers

        raise RuntimeError(
            f"vtoken needs transformers >= 5.18 for {type(base).__name__}: this one ({transformers.__version__}) "
            f"has no {_compat.ENCODER_OUTPUTS!r} argument, so generate() would drop the image features before "
            "the LLM sees them. Upgrade transformers (pip install 'transformers>=5.18')."
        )


def check_continues(layout: CacheLayout, ids: torch.Tensor | None, tail: bool = False) -> None:
    """Refuse ids whose cached part is not what the cache holds (``tail``: ids are the last columns it holds)."""
    held = layout.held_ids()
    if ids is None or held is None:
        return
    held = held[:, layout.columns - ids.shape[1]:] if tail else held
    if held.shape != ids[:, : held.shape[1]].shape or not torch.equal(held, ids[:, : held.shape[1]].to(held.device)):
        raise ValueError(
            "vtoken: input_ids do not continue the conversation this KV cache holds; pass the earlier turns "
            "exactly as generate() returned them (out.sequences), or start without the cache"
        )


def reduce_alike(method: VisualTokenMethod, tensor: torch.Tensor, reduction: Reduction, item: Item) -> torch.Tensor:
    """Another per-token tensor of an item reduced the way its features were: the kept rows, or (for methods that
    synthesise tokens, e.g. pooling) the method applied to it with the same layout."""
    tensor = tensor[: item.n]
    if reduction.kept is not None:
        return tensor[reduction.kept.to(tensor.device)]
    return method.reduce(tensor, item.context).features


def joined_context(contexts: list[ImageContext]) -> ImageContext:
    """The context of items' tokens laid one after another (one image's tiles): their segments shifted to their
    place, and the tower's attention and the pivot scores concatenated (None where a part has none)."""
    if any(c.frames is not None for c in contexts):
        raise ValueError("vtoken: video items cannot be joined")  # no host joins frames: it would need their numbering
    starts = [0]
    for c in contexts[:-1]:
        starts.append(starts[-1] + c.n)
    segments = [dataclasses.replace(s, start=s.start + start) for c, start in zip(contexts, starts) for s in c.segments]
    joined = ImageContext(n=starts[-1] + contexts[-1].n, segments=segments, modality=contexts[0].modality)
    joined.tower = functools.cache(functools.partial(joined_towers, [c.tower for c in contexts]))
    joined.pivot_scores = functools.partial(joined_scores, [c.pivot_scores for c in contexts])
    return joined


def joined_towers(towers: list[Callable[[], TowerTokens | None]]) -> TowerTokens | None:
    parts = [tower() for tower in towers]
    if any(p is None for p in parts) or len({p.source for p in parts}) > 1:
        return None
    return TowerTokens(torch.cat([p.attention for p in parts]), torch.cat([p.keys for p in parts]), parts[0].source)


def joined_scores(scores: list[Callable[[], torch.Tensor | None]]) -> torch.Tensor | None:
    parts = [score() for score in scores]
    return None if any(p is None for p in parts) else torch.cat(parts)


def frame_counts(context: ImageContext, reduction: Reduction) -> list[int]:
    """Kept tokens per frame of an item: which frame each kept (or synthesised) token belongs to."""
    if reduction.kept is not None and context.frames is not None:
        frames = context.frames.to(reduction.kept.device)[reduction.kept]
    elif reduction.frames is not None:
        frames = reduction.frames
    else:
        return [reduction.features.shape[0]]
    frames_in = int(context.frames.max()) + 1 if context.frames is not None else int(frames.max()) + 1
    return torch.bincount(frames.long(), minlength=frames_in).tolist()


def slot_mask(layout: CacheLayout, mask: torch.Tensor) -> torch.Tensor:
    """generate()'s 2-D padding mask over the caller's columns, moved onto the slots of a cache vtoken shortened:
    what a dynamic cache's decode step attends with, and what generate() builds a static cache's 4-D masks from
    (sliding windows included). The first slots (the edited prompt's) are gathered once per layout; later slots
    continue the columns one to one, so each step costs a slice and one concatenation."""
    edited = layout.source.shape[1]
    head = layout.__dict__.get("_slot_padding")
    if head is None:
        head = layout.__dict__["_slot_padding"] = gather_columns(mask, layout.source, 0, dim=1)
    return torch.cat([head, mask[:, edited + layout.columns - layout.slots:]], dim=1)


def renumbered_positions(positions: torch.Tensor | None, layout: CacheLayout | None, edit: PromptEdit | None,
                         length_in: int) -> torch.Tensor | None:
    """(B, q) positions of a call's new tokens, renumbered as if a processor had built the shorter prompt: a kept
    token moves down by the real tokens removed before it (LLaVA). None: the host's own default is right."""
    if layout is None:
        return edit.position_ids(positions)
    if not layout.renumbered:  # nothing was removed before these tokens: their positions stand
        return edit.position_ids(positions) if edit is not None else positions
    if positions is None:
        B = layout.batch
        positions = layout.columns + torch.arange(length_in, device=layout.source.device).expand(B, -1)
    positions = positions - layout.shift_column().to(positions.device)
    return edit.position_ids(positions) if edit is not None else positions


def gather_positions(positions: torch.Tensor, edit: PromptEdit, fill: int = 0) -> torch.Tensor:
    """Position ids of any layout (B, L) or (P, B, L) gathered by an edit's column map."""
    if positions.dim() == 2:
        return edit.gather(positions, fill)
    if not edit.added_padding:  # every column has a source: a plain gather along the last dimension
        return gather_rows(positions.transpose(0, 1), edit.col_map, 2).transpose(0, 1)
    return gather_columns(positions.transpose(0, 1), edit.col_map, fill, dim=2).transpose(0, 1)

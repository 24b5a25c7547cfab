"""Hugging Face LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT
(``LlavaNextForConditionalGeneration``), transformers 5.x.

Hook points, per instance:
* ``model.model.get_image_features`` (the one ``generate()`` calls before prefill) is shadowed on the instance by
  a wrapper that records the vision encoder's [CLS] attention, then lets the method reduce each image's
  projected tokens (boundary stage).
* A forward pre-hook on ``model.model`` (``LlavaModel``) removes the placeholder ids of dropped tokens from the
  prompt (ids or embeddings, mask, position ids; rows re-padded on the left), and on later decode steps of the same
  cache maps ``generate``'s growing mask / position ids onto the shortened prompt.
* Pre-hooks on every decoder layer (``DecoderPruner``) drop visual tokens during prefill (in-LLM stage).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vtoken.adapters import _compat
from vtoken.adapters._vlm import CacheLayout, DecoderPruner, PromptEdit, VLMStats, mask_valid, remap_mask, timed
from vtoken.budget import resolve_budget
from vtoken.handle import Handle
from vtoken.methods.base import GridSegment, ImageContext, Reduction, VisualTokenMethod
from vtoken.registry import register_host


def _is_llava(model) -> bool:
    from transformers import LlavaForConditionalGeneration

    return isinstance(model, LlavaForConditionalGeneration)


def _is_llava_next(model) -> bool:
    from transformers import LlavaNextForConditionalGeneration

    return isinstance(model, LlavaNextForConditionalGeneration)


def cls_attention(layer, x: torch.Tensor) -> torch.Tensor:
    """[CLS]->all attention of a CLIP encoder layer, recomputed from its input ``x`` (views, T, d): (views, T).

    Head-averaged fp32 softmax; needs neither eager attention nor ``output_attentions``.
    """
    attn = _compat.clip_attention(layer)
    h = attn.norm(x)
    views, T, _ = h.shape
    q = attn.q_proj(h[:, :1]).view(views, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(views, T, attn.num_heads, attn.head_dim).transpose(1, 2)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale
    return scores.softmax(dim=-1).mean(dim=1)[:, 0]


# -- LLaVA-NeXT AnyRes geometry (what the processor and LlavaNextModel compute, as plain integer arithmetic) ----------
def best_resolution(image_size, pinpoints) -> tuple[int, int]:
    """The (height, width) pinpoint an image is resized into: the most image pixels kept, then the least padding."""
    height, width = (int(v) for v in image_size)
    best, best_key = None, None
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(pw * ph - effective))
        if best_key is None or key > best_key:
            best, best_key = (ph, pw), key
    return best


def anyres_views(image_size, pinpoints, tile: int) -> int:
    """Views of one image: the high-resolution tiles of its pinpoint plus the thumbnail."""
    height, width = best_resolution(image_size, pinpoints)
    return math.ceil(height / tile) * math.ceil(width / tile) + 1


def unpadded_grid(image_size, pinpoints, tile: int, grid: int) -> tuple[int, int]:
    """(rows, cols) of an image's high-resolution patch grid after the padding around the image is cut away."""
    ph, pw = (s // tile for s in best_resolution(image_size, pinpoints))
    rows, cols = ph * grid, pw * grid
    height, width = (int(v) for v in image_size)
    if width / height > cols / rows:  # padded above and below
        pad = (rows - int(round(height * (cols / width), 7))) // 2
        return rows - 2 * pad, cols
    pad = (cols - int(round(width * (rows / height), 7))) // 2
    return rows, cols - 2 * pad


def check_host_features(base) -> None:
    """Refuse a transformers release that lacks what the adapter relies on, rather than run silently wrong."""
    if not _compat.accepts_encoder_outputs(base):
        import transformers

        raise RuntimeError(
            f"vtoken needs transformers >= 5.18 for {type(base).__name__}: this one ({transformers.__version__}) "
            f"has no {_compat.ENCODER_OUTPUTS!r} argument, so generate() would drop the image features before "
            "the LLM sees them. Upgrade transformers (pip install 'transformers>=5.18')."
        )


_PATCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LlavaModel -> its LlavaPatch

STATIC_CACHE = (
    "vtoken: {methods} change(s) the number of tokens the LLM holds, which needs a DynamicCache (the default); "
    "got {cache}. Leave cache_implementation at its default (no 'static'), or remove the patch for this call."
)


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
    """Something in the vision path that makes ``get_image_features`` return fewer tokens per image than the prompt
    holds placeholders for: a clustering tower (``token_clustering`` with ``reconstruct=False``), TokenFLEX's pooled
    projector. The patch zero-pads its features to the placeholder count for ``generate()``'s bookkeeping and
    shortens the prompt to the real count before the LLM runs."""

    name: str
    stats: Callable[[], object] = lambda: None  # what ``handle.stats.vision`` shows after a call
    # side of each view's square grid, for LLaVA-NeXT's packing (None: the vision tower's own patch grid)
    view_side: Callable[[], int] | None = None


class LlavaPatch:
    """vtoken's hooks on one LLaVA / LLaVA-NeXT instance, shared by at most one LLM-side method (``method``) and one
    feature provider (:class:`FeatureProvider`), in either order; the hooks stay while either is installed. With
    both, the method prunes the provider's tokens."""

    @classmethod
    def of(cls, model) -> LlavaPatch:
        patch = _PATCHES.get(model.model)
        if patch is None:
            patch = cls(model)
            _PATCHES[model.model] = patch
        return patch

    def __init__(self, model):
        check_host_features(model.model)
        self.model, self.base, self.config = model, model.model, model.config
        self.next = _is_llava_next(model)
        self.llm, self.tower = _compat.decoder_of(self.base)
        self.method: VisualTokenMethod | None = None
        self.provider: FeatureProvider | None = None
        self.decoder: DecoderPruner | None = None
        self.stats = VLMStats()
        self.images: dict[int, tuple] = {}  # id(feature entry) -> (entry, ImageContext, real token count)
        self.call: _Call | None = None
        self.base_signature = inspect.signature(self.base.forward)
        self.hooks = Handle(model, "llava hooks", None, "llava")  # the shared hooks' own undo list
        original = self.base.get_image_features

        def get_image_features(*args, **kwargs):
            if self.boundary_method() is None:
                return original(*args, **kwargs)
            return self.image_features(original, *args, **kwargs)

        functools.update_wrapper(get_image_features, original)  # generate() reads its signature
        self.hooks.set_attr(self.base, "get_image_features", get_image_features)
        self.hooks.set_attr(model, "prepare_inputs_for_generation",
                            functools.update_wrapper(self.prepare_inputs(model.prepare_inputs_for_generation),
                                                     model.prepare_inputs_for_generation))
        self.hooks.add_hook(self.base.register_forward_pre_hook(self.before_llm, with_kwargs=True))
        self.hooks.add_hook(self.base.register_forward_hook(self.after_llm, with_kwargs=True))
        self.hooks.add_hook(model.register_forward_pre_hook(self.reject_labels, with_kwargs=True))

    # -- users -------------------------------------------------------------------------------------------------
    def attach_method(self, method: VisualTokenMethod, handle: Handle) -> None:
        self.claim(handle, "vtoken.vlm_tokens")
        handle.on_remove(self.detach_method)
        self.method = method
        handle.stats = self.stats
        self.check_budget()
        if method.score_layers(len(self.llm.layers)):
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
            _PATCHES.pop(self.base, None)
            self.hooks.remove()

    def boundary_method(self) -> VisualTokenMethod | None:
        if self.method is not None and self.method.boundary:
            return self.method
        return _ProvidedTokens() if self.provider is not None else None

    def method_names(self) -> str:
        names = [m for m in (self.method and self.method.method_name, self.provider and self.provider.name) if m]
        return " + ".join(map(repr, names))

    # -- configuration checks ------------------------------------------------------------------------------------
    def tokens_per_view(self) -> int:
        vc = self.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n + int(self.config.vision_feature_select_strategy == "full")

    def check_budget(self) -> None:
        if self.method.boundary and isinstance(self.method.keep, int) and not self.next and self.provider is None:
            resolve_budget(self.method.keep, self.tokens_per_view(), what="visual tokens per image")

    def reject_labels(self, module, args, kwargs):
        if kwargs.get("labels") is not None:
            raise ValueError(
                f"labels are not supported while {self.method_names()} is applied: pruning shortens the "
                "sequence the logits are computed on. Remove the patch for training, or compute the loss from the "
                "returned logits (text tokens keep their order at the end of each row)."
            )

    # -- boundary stage ----------------------------------------------------------------------------------------
    def vision_layers(self):
        return _compat.clip_parts(self.tower)[1]

    def pivot_layer(self, feature_layer) -> int:
        """Index of the vision layer that produces the selected features (its [CLS] attention is the pivot)."""
        layer = feature_layer[-1] if isinstance(feature_layer, (list, tuple)) else feature_layer
        n = len(self.vision_layers())
        return n + layer if layer < 0 else layer - 1

    def image_features(self, original, *args, **kwargs):
        """The original ``get_image_features`` plus what the boundary stage needs later, per image.

        Features come back at full placeholder length (a clustering tower's shorter output is zero-padded), so
        ``generate()``'s own bookkeeping, which splits and repeats features per sample by matching them to
        placeholder counts (beam search, ``num_return_sequences``), still holds; the reduction happens where the
        prompt is shortened, in :meth:`before_llm`. Repeated entries are the same tensors, found again by identity.
        """
        bound = inspect.signature(original).bind(*args, **kwargs)
        call = dict(bound.arguments)
        call.update(call.pop("kwargs", {}))
        feature_layer = call.get("vision_feature_layer")
        if feature_layer is None:
            feature_layer = self.config.vision_feature_layer
        layers = self.vision_layers()
        captured = {}
        has_cls = _compat.clip_parts(self.tower)[2]
        pivot_index = self.pivot_layer(feature_layer)
        if has_cls and 0 <= pivot_index < len(layers):

            def grab(module, a, kw):
                captured["x"] = a[0] if a else kw["hidden_states"]

            hook = layers[pivot_index].register_forward_pre_hook(grab, with_kwargs=True)
        else:
            hook = None
        try:
            out = original(**call)
        finally:
            if hook is not None:
                hook.remove()
        features = list(out.pooler_output)
        contexts = self.image_contexts(features, captured.get("x"), layers[pivot_index] if hook else None,
                                       call.get("image_sizes"))
        # LLaVA-1.5 prompts hold the processor's fixed count per image, even when a feature provider already
        # shortened the image; LLaVA-NeXT's count is the packed feature count of the full patch grid.
        if not self.next:
            placeholders = [self.tokens_per_view()] * len(features)
        elif self.provider is None:
            placeholders = [f.shape[0] for f in features]
        else:
            placeholders = [self.packed_length(size, self.grid_side()) for size in call.get("image_sizes")]
        self.images = {}
        full = []
        for f, ctx, m in zip(features, contexts, placeholders):
            entry = f if f.shape[0] >= m else torch.cat([f, f.new_zeros(m - f.shape[0], f.shape[1])])
            self.images[id(entry)] = (entry, ctx, f.shape[0])
            full.append(entry)
        out.pooler_output = full
        return out

    def reduce_images(self, entries: list[torch.Tensor]) -> list[torch.Tensor]:
        """The boundary stage on the features the LLM is about to get (one entry per image, maybe repeated)."""
        if any(id(e) not in self.images for e in entries):
            raise ValueError(
                "vtoken: precomputed image features (mm_encoder_outputs) must come from this patched "
                "model's get_image_features, so the boundary stage can prune them consistently"
            )
        unique = list({id(e): e for e in entries}.values())  # generate() repeats images per beam / sequence
        with timed(entries[0].device) as t:
            items = [(e[: self.images[id(e)][2]], self.images[id(e)][1]) for e in unique]
            done = dict(zip(map(id, unique), self.boundary_method().reduce_batch(items)))
        self.stats.selection_time_s += t.elapsed
        reductions = [done[id(e)] for e in entries]
        self.stats.visual_tokens_in += [self.images[id(e)][2] for e in entries]
        self.stats.visual_tokens_kept += [r.features.shape[0] for r in reductions]
        self.stats.kept_indices += [None if r.kept is None else r.kept.cpu() for r in reductions]
        return [r.features for r in reductions]

    def grid_side(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    def view_side(self) -> int:
        """Side of each view's square grid in the features the LLM gets (a provider may pool the tower's grid)."""
        if self.provider is not None and self.provider.view_side is not None:
            return self.provider.view_side()
        return self.grid_side()

    def packed_length(self, image_size, side: int) -> int:
        """LLaVA-NeXT's token count for one image whose views are ``side x side`` grids: the thumbnail, then the
        unpadded high-resolution grid (at least one tile) with one ``image_newline`` per row."""
        size = image_size.tolist() if torch.is_tensor(image_size) else image_size
        full = int(self.config.vision_feature_select_strategy == "full")
        rows, cols = unpadded_grid(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size, side)
        return full + side * side + rows * (cols + 1)

    def image_contexts(self, features, cls_input, cls_layer, image_sizes) -> list[ImageContext]:
        vc = self.config.vision_config
        grid = self.view_side()
        full = int(self.config.vision_feature_select_strategy == "full")
        views = self.views_per_image(image_sizes, len(features))
        first_view = torch.tensor([0] + views[:-1]).cumsum(0).tolist()
        cache = {}

        def attention_of_view(v: int) -> torch.Tensor:
            if "probs" not in cache:
                cache["probs"] = cls_attention(cls_layer, cls_input)
            return cache["probs"][v, 1:]

        contexts = []
        for i, f in enumerate(features):
            n = f.shape[0]
            # LLaVA-NeXT's thumbnail is always the full grid; a LLaVA-1.5 image may come from a clustering tower
            side = grid if self.next or n == grid * grid + full else math.isqrt(n - full)
            if self.next or side * side == n - full:
                segments = [GridSegment(full, side, side)]
            else:  # a non-square clustered tower: one row in raster order
                segments = [GridSegment(full, 1, n - full)]
            base_len = full + segments[0].rows * segments[0].cols
            if self.next and views[i] > 1:
                size = image_sizes[i].tolist() if torch.is_tensor(image_sizes[i]) else image_sizes[i]
                rows, cols = unpadded_grid(size, self.config.image_grid_pinpoints, vc.image_size, grid)
                segments.append(GridSegment(base_len, rows, cols, newline=True))
                if base_len + rows * (cols + 1) != n:
                    raise RuntimeError(f"vtoken: unexpected LLaVA-NeXT token layout ({n} tokens for {segments})")

            def pivot_scores(v=first_view[i], n=n, base_len=base_len):
                if cls_input is None:
                    return None
                attention = attention_of_view(v)
                if attention.shape[0] != base_len - full:  # e.g. a clustered tower's pivot layer saw other tokens
                    return None
                scores = torch.full((n,), float("-inf"), device=cls_input.device)
                scores[full:base_len] = attention  # the (thumbnail) base view only
                return scores

            contexts.append(ImageContext(n=n, segments=segments, pivot_scores=pivot_scores))
        return contexts

    def views_per_image(self, image_sizes, n_images: int) -> list[int]:
        if not self.next:
            return [1] * n_images
        tile = self.config.vision_config.image_size
        return [anyres_views(s.tolist() if torch.is_tensor(s) else s, self.config.image_grid_pinpoints, tile)
                for s in image_sizes]

    # -- the LLM call ------------------------------------------------------------------------------------------
    def before_llm(self, module, args, kwargs):
        if args:  # LLaVA-NeXT passes input_ids positionally
            kwargs = {**dict(zip(self.base_signature.parameters, args)), **kwargs}
        self.call = None
        cache = _compat.find_cache(kwargs)
        pixels = kwargs.get("pixel_values")
        encoded = (kwargs.get(_compat.ENCODER_OUTPUTS) or {}).get("image")
        images = encoded is not None or (pixels is not None and pixels.numel() > 0)
        boundary = self.boundary_method()
        if images and cache is not None and not _compat.is_dynamic_cache(cache) and (boundary or self.decoder):
            raise ValueError(STATIC_CACHE.format(methods=self.method_names(), cache=type(cache).__name__))
        layout = self.layout_of(cache, kwargs, images)
        if layout is not None:
            self.skip_cached(kwargs, layout, cache)
        tokens = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        length_in = tokens.shape[1]
        ids = kwargs.get("input_ids")
        if not images:
            if layout is not None:
                self.map_call(kwargs, layout, None, length_in)
            if self.decoder is not None:
                self.decoder.begin_decode(layout)
            self.call = _Call(layout, None, ids, length_in, prefill=False)
            return (), kwargs

        self.stats.reset()
        edit = None
        if boundary is not None:
            if encoded is None:
                encoded = module.get_image_features(
                    pixel_values=pixels,
                    image_sizes=kwargs.get("image_sizes"),
                    vision_feature_layer=kwargs.get("vision_feature_layer"),
                    vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                    return_dict=True,
                )
            if self.provider is not None:
                self.stats.vision = self.provider.stats()
            entries = list(encoded.pooler_output)
            reduced = copy.copy(encoded)  # generate() may pass the same features again (use_cache=False)
            reduced.pooler_output = self.reduce_images(entries)
            kwargs[_compat.ENCODER_OUTPUTS] = {**(kwargs.get(_compat.ENCODER_OUTPUTS) or {}), "image": reduced}
            kwargs["pixel_values"] = None
            edit = self.shorten_prompt(kwargs, [e.shape[0] for e in entries], [f.shape[0] for f in
                                                                                 reduced.pooler_output])
        self.map_call(kwargs, layout, edit, length_in)
        placeholders = self.placeholder_mask(kwargs)
        valid = mask_valid(kwargs.get("attention_mask"), placeholders.shape, placeholders.device)
        self.stats.visual_tokens_llm = (placeholders & valid).sum(1).tolist()
        fresh = layout is None
        if self.decoder is not None and fresh:
            self.decoder.begin_prefill(placeholders, valid)
        else:  # nothing changes inside the decoder: every layer sees the (possibly shortened) new tokens
            if self.decoder is not None:
                note = "in-LLM pruning skipped for images that continue a KV cache (only a prefill is pruned)"
                self.stats.notes.append(note)
                warnings.warn(f"vtoken: {note}", stacklevel=2)
                self.decoder.begin_decode(layout)
            layers = len(self.llm.layers)
            self.stats.tokens_per_layer = [valid.sum(1).tolist()] * layers
            self.stats.visual_tokens_per_layer = [self.stats.visual_tokens_llm] * layers
        self.call = _Call(layout, edit, ids, length_in, prefill=fresh)
        return (), kwargs

    def placeholder_mask(self, kwargs) -> torch.Tensor:
        ids = kwargs.get("input_ids")
        if ids is not None:
            return ids == self.config.image_token_id
        embeds = kwargs["inputs_embeds"]
        image = self.base.get_input_embeddings()(torch.tensor(self.config.image_token_id, device=embeds.device))
        return (embeds == image.to(embeds.dtype)).all(-1)

    def shorten_prompt(self, kwargs, counts_in: list[int], counts_out: list[int]) -> PromptEdit | None:
        """Drop the placeholders of the tokens the boundary stage removed, image by image."""
        placeholders = self.placeholder_mask(kwargs)
        where = placeholders.flatten().nonzero().squeeze(1)
        if where.numel() != sum(counts_in):
            raise ValueError(
                f"Image features and image tokens do not match: the new tokens hold {where.numel()} image tokens, "
                f"the images give {sum(counts_in)}. When a turn continues a KV cache, pass pixel_values for the "
                "images of the new tokens only."
            )
        drop_run = torch.zeros(where.numel(), dtype=torch.bool, device=where.device)
        start = 0
        for n, k in zip(counts_in, counts_out):
            drop_run[start + k : start + n] = True
            start += n
        drop = torch.zeros(placeholders.numel(), dtype=torch.bool, device=where.device)
        drop[where[drop_run]] = True
        drop = drop.view_as(placeholders)
        if not bool(drop.any()):
            return None
        edit = PromptEdit(drop)
        if kwargs.get("input_ids") is not None:
            pad = self.config.text_config.pad_token_id
            kwargs["input_ids"] = edit.gather(kwargs["input_ids"], 0 if pad is None else pad)
        if kwargs.get("inputs_embeds") is not None:
            kwargs["inputs_embeds"] = edit.gather(kwargs["inputs_embeds"], 0)
        return edit

    # -- the cache: continuing what an earlier call wrote ---------------------------------------------------------
    def layout_of(self, cache, kwargs, images: bool) -> CacheLayout | None:
        """The layout of the cache this call continues; None for a fresh prefill (no cache, or an empty one) and for
        text on a cache vtoken did not change (the host's own bookkeeping is right there)."""
        if cache is None or cache.get_seq_length() == 0:
            return None
        layout = CacheLayout.of(cache)
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
        earlier turns hold fewer slots than columns, so the cut moves to the first column the cache does not hold."""

        def prepare_inputs_for_generation(input_ids, *args, **kwargs):
            unseen = kwargs.get(_compat.GENERATE_UNSEEN)
            cache = _compat.find_cache(kwargs)
            layout = CacheLayout.of(cache)
            if layout is not None and unseen is not None and layout.columns != layout.slots:
                tokens = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else input_ids
                if unseen == tokens.shape[1] - int(cache.get_seq_length()):
                    kwargs[_compat.GENERATE_UNSEEN] = tokens.shape[1] - layout.columns
                    check_continues(layout, input_ids if tokens is input_ids else None)
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
        for key in ("input_ids", "inputs_embeds"):
            if kwargs.get(key) is not None:
                kwargs[key] = kwargs[key][:, trim:]
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"][..., trim:]
        if mask.dim() == 4:
            kwargs["attention_mask"] = mask[:, :, trim:]

    def map_call(self, kwargs, layout: CacheLayout | None, edit: PromptEdit | None, length_in: int) -> None:
        """Move the call's mask and positions from the caller's columns to the cache's slots."""
        if layout is None and edit is None:
            return
        B = edit.col_map.shape[0] if edit is not None else layout.batch
        device = edit.col_map.device if edit is not None else layout.source.device
        base = layout.columns if layout is not None else 0
        new = torch.arange(length_in, device=device).expand(B, -1)
        rows = edit.col_map if edit is not None else new
        cols = torch.cat([layout.slot_columns(layout.slots) if layout is not None else new[:, :0],
                          torch.where(rows >= 0, rows + base, -1)], dim=1)
        mask = kwargs.get("attention_mask")
        if mask is None and bool((cols < 0).any()):
            mask = torch.ones(B, base + length_in, dtype=torch.long, device=device)
        if mask is not None:
            kwargs["attention_mask"] = remap_mask(mask, rows, cols)
        positions = kwargs.get("position_ids")
        if layout is None:
            kwargs["position_ids"] = edit.position_ids(positions)
            return
        if positions is None:
            positions = base + new
        positions = positions - layout.shift.to(positions.device).unsqueeze(1)
        kwargs["position_ids"] = edit.position_ids(positions) if edit is not None else positions

    def after_llm(self, module, args, kwargs, output):
        call, self.call = self.call, None
        if self.decoder is not None:
            self.decoder.idle()
        cache = _compat.find_cache(output)
        if call is None or cache is None:
            return output
        pruned = self.decoder.pruned_layers() if self.decoder is not None and call.prefill else None
        layout = call.layout
        if layout is None:
            if call.edit is None and pruned is None:
                return output  # nothing changed: slot i is column i
            B = call.edit.col_map.shape[0] if call.edit is not None else pruned[-1][0].shape[0]
            layout = CacheLayout.identity(B, 0, cache_device(cache, call), self.method_names())
            layout.ids = None if call.ids is None else call.ids[:, :0]
        layout = layout.extended(call.edit, call.ids, call.length_in)
        if pruned is not None:
            layout.pruned, layout.pruned_slots = pruned, layout.slots
        layout.attach(cache)
        return output


def check_continues(layout: CacheLayout, ids: torch.Tensor | None, tail: bool = False) -> None:
    """Refuse ids whose cached part is not what the cache holds (``tail``: ids are the last columns it holds)."""
    if ids is None or layout.ids is None:
        return
    held = layout.ids[:, layout.columns - ids.shape[1]:] if tail else layout.ids
    if held.shape != ids[:, : held.shape[1]].shape or not torch.equal(held, ids[:, : held.shape[1]].to(held.device)):
        raise ValueError(
            "vtoken: input_ids do not continue the conversation this KV cache holds; pass the earlier turns "
            "exactly as generate() returned them (out.sequences), or start without the cache"
        )


def cache_device(cache, call: _Call):
    source = call.edit.col_map if call.edit is not None else call.ids
    return source.device if source is not None else torch.device("cpu")


@dataclass
class _ProvidedTokens(VisualTokenMethod):
    """Boundary stage that keeps every token a feature provider returns: the prompt only needs its placeholders
    shortened to the provider's count."""

    keep: float = 1.0
    boundary = True
    method_name = "feature provider"

    def reduce(self, features: torch.Tensor, ctx: ImageContext) -> Reduction:
        return Reduction(features, torch.arange(ctx.n, device=features.device))


def install_clustered_tower(model, config, handle) -> None:
    """``token_clustering`` on a LLaVA: cluster inside the CLIP tower.

    ``reconstruct=True``: the tower maps back to every patch by the layer LLaVA reads (``reconstruct_after``
    defaults to ``vision_feature_layer``), so the prompt is unchanged and only the tower gets cheaper.
    ``reconstruct=False``: the LLM gets the M cluster tokens per image and the prompt is shortened to match.
    """
    from vtoken.adapters.vit import install_hf_clip
    from vtoken.methods.clustering import MIN_DEPTH

    _, tower = _compat.decoder_of(model.model)
    depth = len(_compat.clip_parts(tower)[1])
    feature_layer = model.config.vision_feature_layer
    if isinstance(feature_layer, (list, tuple)):
        raise ValueError("token_clustering on LLaVA needs a single vision_feature_layer, got "
                         f"{feature_layer}; patch model.model.vision_tower directly instead")
    read = feature_layer % (depth + 1)  # hidden_states index LLaVA reads = blocks run before it
    if read < MIN_DEPTH:
        blocks = MIN_DEPTH - 1 - feature_layer  # a negative feature layer counts from the end
        needed = (f"with vision_feature_layer={feature_layer}: a tower of at least {blocks} blocks"
                  if feature_layer < 0 else f"vision_feature_layer >= {MIN_DEPTH}")
        raise ValueError(
            f"token_clustering cannot apply to this LLaVA's vision tower: LLaVA reads the output of block {read} of "
            f"{depth} (vision_feature_layer={feature_layer}), and clustering needs a full-resolution block before it "
            f"and a block on the clusters up to that output, so the feature layer must be the output of block "
            f"{MIN_DEPTH} or later ({needed})"
        )
    if config.reconstruct:
        if config.reconstruct_after is None:
            config = dataclasses.replace(config, reconstruct_after=read)
        alpha, beta = config.placement(depth)
        if beta > read:
            raise ValueError(
                f"reconstruct_after={config.reconstruct_after} reconstructs after block {beta}, but LLaVA reads the "
                f"output of block {read} (vision_feature_layer={feature_layer}); use reconstruct_after <= {read}"
            )
        install_hf_clip(tower, config, handle)
        return
    alpha, _ = config.placement(depth)
    if alpha >= read:
        raise ValueError(
            f"cluster_after={alpha} clusters after LLaVA's feature layer (the output of block {read}, "
            f"vision_feature_layer={feature_layer}); use cluster_after < {read}"
        )
    tower_handle = Handle(tower, handle.method, config, "hf_clip_vision")
    handle.on_remove(tower_handle.remove)
    install_hf_clip(tower, config, tower_handle)
    LlavaPatch.of(model).attach_provider(FeatureProvider("token_clustering", stats=lambda: tower_handle.stats), handle)


@register_host("llava", "transformers LlavaForConditionalGeneration (LLaVA-1.5)", matches=_is_llava)
def install_llava(model, method, handle) -> None:
    if method.method_name == "token_clustering":
        install_clustered_tower(model, method, handle)
    elif method.method_name == "tokenflex":
        from vtoken.adapters.llava_tokenflex import install_tokenflex

        install_tokenflex(model, method, handle)
    else:
        LlavaPatch.of(model).attach_method(method, handle)


@register_host("llava_next", "transformers LlavaNextForConditionalGeneration (LLaVA-NeXT / 1.6)",
               matches=_is_llava_next)
def install_llava_next(model, method, handle) -> None:
    if method.method_name == "tokenflex":
        from vtoken.adapters.llava_tokenflex import install_tokenflex

        install_tokenflex(model, method, handle)
    else:
        LlavaPatch.of(model).attach_method(method, handle)

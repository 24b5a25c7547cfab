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
import weakref
from dataclasses import dataclass

import torch

from vtoken.adapters._vlm import DecoderPruner, PromptEdit, VLMStats, timed
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


def vision_encoder(tower):
    """The CLIP-like transformer inside a vision tower (transformers >= 5.2x flattened ``vision_model`` away)."""
    return getattr(tower, "vision_model", tower)


def cls_attention(layer, x: torch.Tensor) -> torch.Tensor:
    """[CLS]->all attention of a CLIP encoder layer, recomputed from its input ``x`` (views, T, d): (views, T).

    Head-averaged fp32 softmax; needs neither eager attention nor ``output_attentions``.
    """
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    views, T, _ = h.shape
    q = attn.q_proj(h[:, :1]).view(views, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(views, T, attn.num_heads, attn.head_dim).transpose(1, 2)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale
    return scores.softmax(dim=-1).mean(dim=1)[:, 0]


class LlavaPatch:
    """All hooks of one method on one LLaVA / LLaVA-NeXT instance."""

    def __init__(self, model, method: VisualTokenMethod, handle, tower_handle=None):
        self.model = model
        self.tower_handle = tower_handle
        self.base = model.model
        self.config = model.config
        self.method = method
        self.next = _is_llava_next(model)
        self.stats = VLMStats()
        handle.stats = self.stats
        self.edit: PromptEdit | None = None
        self.images: dict[int, tuple] = {}  # id(feature entry) -> (entry, ImageContext, real token count)
        self.in_prefill = False
        handle.claim(self.base, "vtoken.vlm_tokens")
        self.check_budget()

        decoder = self.base.language_model
        self.decoder = None
        if method.score_layers(len(decoder.layers)):
            self.decoder = DecoderPruner(decoder, method, self.stats, handle)
        if method.boundary:
            original = self.base.get_image_features

            def get_image_features(*args, **kwargs):
                return self.image_features(original, *args, **kwargs)

            functools.update_wrapper(get_image_features, original)  # generate() reads its signature
            handle.set_attr(self.base, "get_image_features", get_image_features)
        handle.add_hook(self.base.register_forward_pre_hook(self.before_llm, with_kwargs=True))
        handle.add_hook(self.base.register_forward_hook(self.after_llm, with_kwargs=True))
        handle.add_hook(model.register_forward_pre_hook(self.reject_labels, with_kwargs=True))
        self.base_signature = inspect.signature(self.base.forward)

    # -- configuration checks ------------------------------------------------------------------------------------
    def tokens_per_view(self) -> int:
        vc = self.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n + int(self.config.vision_feature_select_strategy == "full")

    def check_budget(self) -> None:
        if self.method.boundary and isinstance(self.method.keep, int) and not self.next:
            resolve_budget(self.method.keep, self.tokens_per_view(), what="visual tokens per image")

    def reject_labels(self, module, args, kwargs):
        if kwargs.get("labels") is not None:
            raise ValueError(
                f"labels are not supported while {self.method.method_name!r} is applied: pruning shortens the "
                "sequence the logits are computed on. Remove the patch for training, or compute the loss from the "
                "returned logits (text tokens keep their order at the end of each row)."
            )

    # -- boundary stage ----------------------------------------------------------------------------------------
    def vision_layers(self):
        return vision_encoder(self.base.vision_tower).encoder.layers

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
        has_cls = hasattr(vision_encoder(self.base.vision_tower).embeddings, "class_embedding")
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
        # LLaVA-1.5 prompts hold the processor's fixed count per image, even when the tower itself already
        # shortened the image (token clustering); LLaVA-NeXT's count is the packed feature count.
        placeholders = [f.shape[0] for f in features] if self.next else [self.tokens_per_view()] * len(features)
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
            done = dict(zip(map(id, unique), self.method.reduce_batch(items)))
        self.stats.selection_time_s += t.elapsed
        reductions = [done[id(e)] for e in entries]
        self.stats.visual_tokens_in += [self.images[id(e)][2] for e in entries]
        self.stats.visual_tokens_kept += [r.features.shape[0] for r in reductions]
        self.stats.kept_indices += [None if r.kept is None else r.kept.cpu() for r in reductions]
        return [r.features for r in reductions]

    def image_contexts(self, features, cls_input, cls_layer, image_sizes) -> list[ImageContext]:
        vc = self.config.vision_config
        grid = vc.image_size // vc.patch_size
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
                rows, cols = self.unpadded_grid(image_sizes[i], grid)
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
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [
            image_size_to_num_patches(s, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
            for s in image_sizes
        ]

    def unpadded_grid(self, image_size, grid: int) -> tuple[int, int]:
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        ph, pw = get_anyres_image_grid_shape(image_size, self.config.image_grid_pinpoints,
                                             self.config.vision_config.image_size)
        shape = unpad_image(torch.empty(1, ph * grid, pw * grid), image_size).shape
        return int(shape[1]), int(shape[2])

    # -- the LLM call ------------------------------------------------------------------------------------------
    def before_llm(self, module, args, kwargs):
        if args:  # LLaVA-NeXT passes input_ids positionally
            kwargs = {**dict(zip(self.base_signature.parameters, args)), **kwargs}
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        tokens = ids if ids is not None else embeds
        cache = kwargs.get("past_key_values")
        pixels = kwargs.get("pixel_values")
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        self.in_prefill = False
        if (pixels is None or pixels.numel() == 0) and encoded is None:
            self.continue_decode(kwargs, cache, tokens.shape[1])
            return (), kwargs
        self.in_prefill = True
        self.edit = None
        self.stats.reset()
        if self.method.boundary:
            if encoded is None:
                encoded = module.get_image_features(
                    pixel_values=pixels,
                    image_sizes=kwargs.get("image_sizes"),
                    vision_feature_layer=kwargs.get("vision_feature_layer"),
                    vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                    return_dict=True,
                )
            if self.tower_handle is not None:
                self.stats.vision = self.tower_handle.stats
            entries = list(encoded.pooler_output)
            reduced = copy.copy(encoded)  # generate() may pass the same features again (use_cache=False)
            reduced.pooler_output = self.reduce_images(entries)
            kwargs["mm_encoder_outputs"] = {**(kwargs.get("mm_encoder_outputs") or {}), "image": reduced}
            kwargs["pixel_values"] = None
            self.shorten_prompt(kwargs, [e.shape[0] for e in entries])
        placeholders = self.placeholder_mask(kwargs)
        mask = kwargs.get("attention_mask")
        valid = mask.bool() if mask is not None else torch.ones_like(placeholders)
        self.stats.visual_tokens_llm = (placeholders & valid).sum(1).tolist()
        if self.decoder is not None:
            self.decoder.begin_prefill(placeholders, valid, cache)
        else:  # nothing changes inside the decoder: every layer sees the (possibly shortened) prompt
            layers = len(self.base.language_model.layers)
            self.stats.tokens_per_layer = [valid.sum(1).tolist()] * layers
            self.stats.visual_tokens_per_layer = [self.stats.visual_tokens_llm] * layers
        return (), kwargs

    def placeholder_mask(self, kwargs) -> torch.Tensor:
        ids = kwargs.get("input_ids")
        if ids is not None:
            return ids == self.config.image_token_id
        embeds = kwargs["inputs_embeds"]
        image = self.base.get_input_embeddings()(torch.tensor(self.config.image_token_id, device=embeds.device))
        return (embeds == image.to(embeds.dtype)).all(-1)

    def shorten_prompt(self, kwargs, counts_in: list[int]) -> None:
        """Drop the placeholders of the tokens the boundary stage removed, image by image."""
        counts_out = [f.shape[0] for f in kwargs["mm_encoder_outputs"]["image"].pooler_output]
        placeholders = self.placeholder_mask(kwargs)
        where = placeholders.flatten().nonzero().squeeze(1)
        if where.numel() != sum(counts_in):
            raise ValueError(
                f"Image features and image tokens do not match: the prompt has {where.numel()} image tokens, "
                f"the images give {sum(counts_in)}"
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
            return
        edit = PromptEdit(drop, kwargs.get("attention_mask"))
        if kwargs.get("input_ids") is not None:
            pad = self.config.text_config.pad_token_id
            kwargs["input_ids"] = edit.gather(kwargs["input_ids"], 0 if pad is None else pad)
        if kwargs.get("inputs_embeds") is not None:
            kwargs["inputs_embeds"] = edit.gather(kwargs["inputs_embeds"], 0)
        kwargs["position_ids"] = edit.position_ids(kwargs.get("position_ids"))
        kwargs["attention_mask"] = edit.attention_mask(kwargs.get("attention_mask"))
        self.edit = edit

    def continue_decode(self, kwargs, cache, q: int) -> None:
        """A call without images: a decode step of the last prefill's cache gets the same shortening."""
        edit = self.edit
        if edit is not None and cache is not None and edit.cache_ref is not None and edit.cache_ref() is cache:
            cached = cache.get_seq_length()
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.dim() == 2 and mask.shape[1] == edit.length_in + cached - edit.length_out + q:
                kwargs["attention_mask"] = edit.decode_attention_mask(mask)
            kwargs["position_ids"] = edit.decode_position_ids(kwargs.get("position_ids"), cached, q)
        if self.decoder is not None:
            self.decoder.begin_decode(cache)

    def after_llm(self, module, args, kwargs, output):
        if self.in_prefill:
            cache = getattr(output, "past_key_values", None)
            if self.edit is not None and cache is not None:
                self.edit.cache_ref = weakref.ref(cache)
            if self.decoder is not None:
                self.decoder.bind_cache(cache)
        if self.decoder is not None:
            self.decoder.idle()
        self.in_prefill = False
        return output


@dataclass
class _TowerOutput(VisualTokenMethod):
    """Boundary stage that keeps every token the vision tower returns: with a clustering tower the prompt only
    needs its placeholders shortened to the tower's M tokens."""

    keep: float = 1.0
    boundary = True
    method_name = "token_clustering"

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

    tower = model.model.vision_tower
    depth = len(vision_encoder(tower).encoder.layers)
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
    LlavaPatch(model, _TowerOutput(), handle, tower_handle)


@register_host("llava", "transformers LlavaForConditionalGeneration (LLaVA-1.5)", matches=_is_llava)
def install_llava(model, method, handle) -> None:
    if method.method_name == "token_clustering":
        install_clustered_tower(model, method, handle)
    else:
        LlavaPatch(model, method, handle)


@register_host("llava_next", "transformers LlavaNextForConditionalGeneration (LLaVA-NeXT / 1.6)",
               matches=_is_llava_next)
def install_llava_next(model, method, handle) -> None:
    LlavaPatch(model, method, handle)

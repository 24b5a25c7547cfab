"""Hugging Face LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT
(``LlavaNextForConditionalGeneration``), transformers 5.x.

The hooks themselves are the shared :class:`~vtoken.adapters.vlm.host.VLMPatch`; this file says where LLaVA keeps
things: one image modality encoded by ``model.model.get_image_features``, the CLIP tower's [CLS] attention (the
ToDRE pivot, recomputed from the input of the layer LLaVA reads), the AnyRes layout of LLaVA-NeXT (thumbnail, then the
unpadded high-resolution grid with one ``image_newline`` per row), and a fixed placeholder count per LLaVA-1.5 image.
Positions follow a processor's shorter prompt (kept tokens renumbered).
"""

from __future__ import annotations

import functools
import itertools
import math
import weakref

import torch

from vtoken.adapters import _compat
from vtoken.adapters.vlm.host import Modality, VLMPatch
from vtoken.adapters.vlm.tower import TowerReader, anyres_grid, feature_layer_reader, place, tower_tokens
from vtoken.budget import resolve_budget
from vtoken.methods.base import GridSegment, ImageContext, TowerTokens
from vtoken.registry import register_host


def is_llava(model) -> bool:
    from transformers import LlavaForConditionalGeneration

    return isinstance(model, LlavaForConditionalGeneration)


def is_llava_next(model) -> bool:
    from transformers import LlavaNextForConditionalGeneration

    return isinstance(model, LlavaNextForConditionalGeneration)


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


def base_view_scores(reader: TowerReader, first: int, n: int, full: int, base_len: int) -> torch.Tensor | None:
    """ToDRE's pivot scores: the [CLS] attention of the base view's (thumbnail's) patches, -inf elsewhere (read from
    that view's map alone: the crops' mapping is not needed)."""
    maps = reader.view_maps()
    if maps is None or maps.shape[1] - 1 != base_len - full:  # e.g. a clustering tower's layer saw other tokens
        return None
    scores = maps.new_full((n,), float("-inf"))
    scores[full:base_len] = maps[first, 1:, 0]
    return scores


class LlavaPatch(VLMPatch):
    """vtoken's hooks on one LLaVA / LLaVA-NeXT instance (see :class:`VLMPatch`): one image modality, [CLS]
    attention of the CLIP tower as the pivot, AnyRes layouts, positions renumbered like a processor's shorter
    prompt."""

    host = "llava"

    def __init__(self, model):
        self.next = is_llava_next(model)
        super().__init__(model)

    def modalities(self) -> list[Modality]:
        return [Modality("image", "get_image_features", "pixel_values", self.config.image_token_id)]

    def tokens_per_view(self) -> int:
        vc = self.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n + int(self.config.vision_feature_select_strategy == "full")

    def check_budget(self) -> None:
        if self.method.boundary and isinstance(self.method.keep, int) and not self.next and self.provider is None:
            resolve_budget(self.method.keep, self.tokens_per_view(), what="visual tokens per image")

    def placeholder_counts(self, modality: Modality, features: list[torch.Tensor], call: dict) -> list[int]:
        # LLaVA-1.5 prompts hold the processor's fixed count per image, even when a feature provider already
        # shortened the image; LLaVA-NeXT's count is the packed feature count of the full patch grid.
        if not self.next:
            return [self.tokens_per_view()] * len(features)
        if self.provider is None:
            return [f.shape[0] for f in features]
        return [self.packed_length(size, self.grid_side()) for size in self.host_sizes(call.get("image_sizes"))]

    def encoder_call(self, modality: Modality, kwargs: dict) -> dict:
        return dict(pixel_values=kwargs.get("pixel_values"), image_sizes=kwargs.get("image_sizes"),
                    vision_feature_layer=kwargs.get("vision_feature_layer"),
                    vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"), return_dict=True)

    def vision_layers(self):
        return _compat.clip_parts(self.tower)[1]

    def encode(self, modality: Modality, original, call: dict):
        """The original ``get_image_features``, capturing the input of the layer LLaVA reads (its [CLS] attention:
        ToDRE's pivot, VisionZip's ranking; none without a [CLS])."""
        has_cls = _compat.has_cls_token(self.tower)
        reader = feature_layer_reader(self.tower, self.vision_layers(), call, self.config) if has_cls else None
        out = original(**call) if reader is None else reader.capture(original, call)
        sizes = self.host_sizes(call.get("image_sizes")) if self.next else None
        return out, self.image_contexts(list(out.pooler_output), reader, sizes)

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
        size = list(image_size)
        full = int(self.config.vision_feature_select_strategy == "full")
        rows, cols = unpadded_grid(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size, side)
        return full + side * side + rows * (cols + 1)

    def image_contexts(self, features, reader: TowerReader | None, image_sizes) -> list[ImageContext]:
        vc = self.config.vision_config
        grid = self.view_side()
        full = int(self.config.vision_feature_select_strategy == "full")
        views = self.views_per_image(image_sizes, len(features))
        first_view = [0, *itertools.accumulate(views[:-1])]
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
            tiles = None
            if self.next and views[i] > 1:
                size = image_sizes[i]
                rows, cols = unpadded_grid(size, self.config.image_grid_pinpoints, vc.image_size, grid)
                segments.append(GridSegment(base_len, rows, cols, newline=True))
                if base_len + rows * (cols + 1) != n:
                    raise RuntimeError(f"vtoken: unexpected LLaVA-NeXT token layout ({n} tokens for {segments})")
                tiles = tuple(s // vc.image_size for s in best_resolution(size, self.config.image_grid_pinpoints))
            context = ImageContext(n=n, segments=segments)
            if reader is not None:
                tower = functools.cache(functools.partial(self.tower_of, reader, context, first_view[i], views[i],
                                                          tiles))
                context.tower = tower
                context.pivot_scores = functools.partial(base_view_scores, reader, first_view[i], n, full, base_len)
            contexts.append(context)
        return contexts

    def tower_of(self, reader: TowerReader, context: ImageContext, first: int, views: int,
                 tiles: tuple[int, int] | None) -> TowerTokens | None:
        """The tower's attention and keys on one image's tokens: the base view's tokens ([CLS] first under the
        'full' strategy) and, on LLaVA-NeXT, every crop's patches as the model packs them (no entry for the
        ``image_newline`` tokens)."""
        maps = reader.view_maps()
        full = int(self.config.vision_feature_select_strategy == "full")
        base = context.segments[0]
        if maps is None or maps.shape[1] - 1 + full != base.start + base.rows * base.cols:
            return None  # e.g. a clustering tower: the layer saw other tokens than the projector gets
        parts = [(torch.arange(base.start + base.rows * base.cols), maps[first, 1 - full:])]
        if tiles is not None:
            high = context.segments[1]
            crops = anyres_grid(maps[first + 1:first + views, 1:], tiles, high.rows, high.cols)
            parts.append((high.patch_index().flatten(), crops))
        return tower_tokens(place(context.n, parts), reader.source)

    def host_sizes(self, image_sizes) -> list[list[int]] | None:
        """LLaVA-NeXT's image sizes on the host, read once per tensor: the layout of every image follows from them,
        and each read waits for the device (the model reads them too)."""
        if image_sizes is None or not torch.is_tensor(image_sizes):
            return None if image_sizes is None else [list(map(int, size)) for size in image_sizes]
        last = self.__dict__.get("_sizes")
        if last is None or last[0]() is not image_sizes:
            last = self.__dict__["_sizes"] = (weakref.ref(image_sizes), image_sizes.tolist())
        return last[1]

    def views_per_image(self, image_sizes, n_images: int) -> list[int]:
        if not self.next:
            return [1] * n_images
        tile = self.config.vision_config.image_size
        return [anyres_views(s, self.config.image_grid_pinpoints, tile) for s in image_sizes]


register_host("llava", "transformers LlavaForConditionalGeneration (LLaVA-1.5)", matches=is_llava,
              installers={"boundary": LlavaPatch.install, "in_llm": LlavaPatch.install,
                          "tower_attention": LlavaPatch.install})
register_host("llava_next", "transformers LlavaNextForConditionalGeneration (LLaVA-NeXT / 1.6)",
              matches=is_llava_next, installers={"boundary": LlavaPatch.install, "in_llm": LlavaPatch.install,
                                                 "tower_attention": LlavaPatch.install})

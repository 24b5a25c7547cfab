"""Hugging Face LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``), images and videos, transformers 5.x.

The hooks are the shared :class:`~vtoken.adapters.vlm.host.VLMPatch`; this file says where OneVision keeps things:

* images (``get_image_features``): a prompt with one image gets AnyRes like LLaVA-NeXT (the base view, then the
  unpadded high-resolution grid with one ``image_newline`` per row), except that a grid larger than
  ``anyres_max_N`` base views is first scaled down bilinearly to about N of them; in a prompt with several images
  (``batch_num_images``) each image is its base view only, followed by one ``image_newline``;
* videos (``get_video_features``): every frame's grid pooled 2x2 (bilinear), frames in order, then one
  ``image_newline`` for the whole video;
* positions are 1-D (Qwen2's RoPE), renumbered like a processor's shorter prompt, as on LLaVA.

OneVision's SigLIP tower has no [CLS] token: ToDRE's pivot is a seeded random token (as on Qwen-VL), and the tower's
attention on a token (VisionZip's ranking) is what it receives, averaged over every query of its view.
"""

from __future__ import annotations

import functools
import math

import torch

from vtoken.adapters import _compat
from vtoken.adapters.llava import best_resolution, unpadded_grid
from vtoken.adapters.vlm.host import Modality, VLMPatch
from vtoken.adapters.vlm.tower import (
    TowerReader,
    anyres_grid,
    feature_layer_reader,
    place,
    resize_grid,
    tower_tokens,
)
from vtoken.methods.base import GridSegment, ImageContext, TowerTokens
from vtoken.registry import register_host


def is_llava_onevision(model) -> bool:
    from transformers import LlavaOnevisionForConditionalGeneration

    return isinstance(model, LlavaOnevisionForConditionalGeneration)


def max_views(vision_aspect_ratio: str) -> int:
    """N of ``anyres_max_N``: how many base views' worth of tokens a high-resolution grid may hold."""
    if not (vision_aspect_ratio.startswith("anyres_max_") and vision_aspect_ratio[11:].isdigit()):
        raise ValueError(f"vtoken: LLaVA-OneVision's vision_aspect_ratio must be 'anyres_max_<N>'; got "
                         f"{vision_aspect_ratio!r}")
    return int(vision_aspect_ratio[11:])


def high_resolution_grid(image_size, pinpoints, tile: int, side: int, vision_aspect_ratio: str) -> tuple[int, int]:
    """(rows, cols) of an image's high-resolution grid as OneVision packs it: unpadded, then scaled down (with the
    model's own float arithmetic) when it holds more than ``anyres_max_N`` base views by over 10%."""
    rows, cols = unpadded_grid(image_size, pinpoints, tile, side)
    ratio = math.sqrt(rows * cols / (max_views(vision_aspect_ratio) * side**2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


def image_context(image_size, pinpoints, tile: int, side: int, vision_aspect_ratio: str, anyres: bool) -> ImageContext:
    """The token layout of one image: the base view (``side x side``), then either the high-resolution grid with a
    separator per row (``anyres``) or one trailing separator."""
    base = GridSegment(0, side, side)
    if not anyres:
        return ImageContext(n=side * side + 1, segments=[base])
    rows, cols = high_resolution_grid(image_size, pinpoints, tile, side, vision_aspect_ratio)
    high = GridSegment(side * side, rows, cols, newline=True)
    return ImageContext(n=side * side + high.length, segments=[base, high])


def video_context(frames: int, side: int) -> ImageContext:
    """The token layout of one video: a ``ceil(side/2)``-square pooled grid per frame, then one separator (counted
    with the last frame)."""
    pooled = math.ceil(side / 2)
    per_frame = pooled * pooled
    segments = [GridSegment(f * per_frame, pooled, pooled) for f in range(frames)]
    frame_of = torch.arange(frames).repeat_interleave(per_frame)
    frame_of = torch.cat([frame_of, torch.tensor([frames - 1])])
    return ImageContext(n=frames * per_frame + 1, segments=segments, modality="video", frames=frame_of)


class LlavaOnevisionPatch(VLMPatch):
    """vtoken's hooks on one LLaVA-OneVision instance (see the module docstring)."""

    host = "llava_onevision"

    def modalities(self) -> list[Modality]:
        return [Modality("image", "get_image_features", "pixel_values", self.config.image_token_id),
                Modality("video", "get_video_features", "pixel_values_videos", self.config.video_token_id)]

    def encoder_call(self, modality: Modality, kwargs: dict) -> dict:
        # what the model's own forward passes its encoders (it leaves vision_aspect_ratio to the config)
        common = dict(vision_feature_layer=kwargs.get("vision_feature_layer"),
                      vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"), return_dict=True)
        if modality.name == "video":
            return dict(pixel_values_videos=kwargs["pixel_values_videos"], **common)
        return dict(pixel_values=kwargs["pixel_values"], image_sizes=kwargs.get("image_sizes"),
                    batch_num_images=kwargs.get("batch_num_images"), **common)

    def grid_side(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    def encode(self, modality: Modality, original, call: dict):
        reader = feature_layer_reader(self.tower, _compat.vision_blocks(self.tower), call, self.config)
        out = original(**call) if reader is None else reader.capture(original, call)
        side = self.grid_side()
        if modality.name == "video":
            frames = call["pixel_values_videos"].shape[1]
            contexts = [video_context(frames, side) for _ in range(out.pooler_output.shape[0])]
            views = [(v * frames, frames, None) for v in range(len(contexts))]
        else:
            contexts, views = self.image_contexts(call)
        for context, features, (first, count, crops) in zip(contexts, out.pooler_output, views):
            if context.n != features.shape[0]:
                raise RuntimeError(f"vtoken: unexpected LLaVA-OneVision {modality.name} layout ({features.shape[0]} "
                                   f"tokens where {context.n} were expected from {context.segments})")
            if reader is not None:
                context.tower = functools.cache(functools.partial(self.tower_of, reader, context, first, count, crops))
        return out, contexts

    def tower_of(self, reader: TowerReader, context: ImageContext, first: int, views: int, crops) -> TowerTokens | None:
        """The tower's attention and keys on one item's tokens, through OneVision's geometry: the base view, then
        the crops unpadded and scaled down like their features (``crops``: their (down, across) grid and the image's
        size); a video's frames pooled 2x2 bilinearly like theirs. Separators get none."""
        maps = reader.view_maps()
        side = self.grid_side()
        if maps is None:
            return None
        maps = maps[first:first + views, maps.shape[1] - side * side:]  # under 'default' the first token is dropped
        if context.modality == "video":
            parts = [(segment.patch_index().flatten(), resize_grid(maps[f].view(side, side, -1), segment.rows,
                                                                   segment.cols))
                     for f, segment in enumerate(context.segments)]
        else:
            parts = [(context.segments[0].patch_index().flatten(), maps[0])]
            if crops is not None:
                high, (tiles, size) = context.segments[1], crops
                rows, cols = unpadded_grid(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size,
                                           side)
                grid = resize_grid(anyres_grid(maps[1:], tiles, rows, cols), high.rows, high.cols)
                parts.append((high.patch_index().flatten(), grid))
        return tower_tokens(place(context.n, parts), reader.source)

    def image_contexts(self, call: dict) -> tuple[list[ImageContext], list[tuple[int, int, tuple | None]]]:
        """Each image's token layout, and where its views are among the tower's: (first view, views, None or its
        crops' (down, across) grid and the image's size)."""
        sizes = call.get("image_sizes")
        # one read of the sizes and of images per prompt (the model reads both too): the layouts are host arithmetic
        sizes = sizes.tolist() if torch.is_tensor(sizes) else [list(map(int, s)) for s in sizes]
        per_prompt = call.get("batch_num_images")
        if per_prompt is None:
            anyres = [True] * len(sizes)
        else:
            per_prompt = per_prompt.tolist() if torch.is_tensor(per_prompt) else list(per_prompt)
            anyres = [n == 1 for n in per_prompt for _ in range(n)]
        aspect = call.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
        tile, side, pinpoints = self.config.vision_config.image_size, self.grid_side(), self.config.image_grid_pinpoints
        contexts = [image_context(size, pinpoints, tile, side, aspect, a) for size, a in zip(sizes, anyres)]
        views, first = [], 0
        for size, a in zip(sizes, anyres):
            tiles = tuple(s // tile for s in best_resolution(size, pinpoints)) if a else None
            count = 1 + (tiles[0] * tiles[1] if a else 0)
            views.append((first, count, (tiles, size) if a else None))
            first += count
        return contexts, views

    def packed(self, modality: Modality, output):
        # the model flattens a video output of shape (videos, tokens, D); reduced videos differ in length, so they
        # travel as one row holding every video's tokens in order, which flattens to the same sequence
        if modality.name == "video" and not torch.is_tensor(output.pooler_output):
            output.pooler_output = torch.cat(list(output.pooler_output)).unsqueeze(0)
        return output


register_host("llava_onevision", "transformers LlavaOnevisionForConditionalGeneration (LLaVA-OneVision), images and "
              "videos", matches=is_llava_onevision,
              installers={"boundary": LlavaOnevisionPatch.install, "in_llm": LlavaOnevisionPatch.install,
                          "tower_attention": LlavaOnevisionPatch.install})

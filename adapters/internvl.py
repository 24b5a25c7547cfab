"""Hugging Face InternVL (``InternVLForConditionalGeneration``: InternVL3 / 3.5), transformers 5.x.

The hooks are the shared :class:`~vtoken.adapters.vlm.host.VLMPatch`; this file says where InternVL keeps things:

* the processor cuts an image into tiles (a grid of 448 px tiles plus a thumbnail) and a video into frames, each
  one view of the vision tower; ``get_image_features`` returns every view's tokens, a pixel-shuffled square grid
  (16 x 16 = 256 at 448 px), with nothing in the model's call saying which views form one image. The prompt says it:
  each image (or frame) is one run of placeholders, so vtoken joins its views into one item before the boundary
  stage, and a budget applies per image, its tiles ranked together (one read of the device per prefill: the runs);
* positions are 1-D (Qwen2.5 / InternLM3 RoPE), renumbered like a processor's shorter prompt, as on LLaVA.

The tower's attention (ToDRE's pivot, VisionZip's ranking) is InternViT's [CLS] attention at the layer InternVL reads,
summed over each token's 2 x 2 pixel-shuffled patches.
"""

from __future__ import annotations

import copy
import functools

import torch

from vtoken.adapters import _compat
from vtoken.adapters.vlm.columns import placeholder_runs
from vtoken.adapters.vlm.host import Modality, VLMPatch
from vtoken.adapters.vlm.tower import TowerReader, feature_layer_reader, merge_patches, tower_tokens
from vtoken.methods.base import GridSegment, ImageContext, TowerTokens
from vtoken.registry import register_host


def is_internvl(model) -> bool:
    from transformers import InternVLForConditionalGeneration

    return isinstance(model, InternVLForConditionalGeneration)


class InternVLPatch(VLMPatch):
    """vtoken's hooks on one InternVL instance (see the module docstring)."""

    host = "internvl"

    def modalities(self) -> list[Modality]:
        return [Modality("image", "get_image_features", "pixel_values", self.config.image_token_id)]

    def encoder_call(self, modality: Modality, kwargs: dict) -> dict:
        return dict(pixel_values=kwargs["pixel_values"], vision_feature_layer=kwargs.get("vision_feature_layer"),
                    vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"), return_dict=True)

    def view_side(self) -> int:
        """Side of a view's token grid after the pixel shuffle (448 px / 14 px patches x 0.5 = 16)."""
        vc = self.config.vision_config
        patches = _compat.square_size(vc.image_size) // _compat.square_size(vc.patch_size)
        return int(patches * self.config.downsample_ratio)

    def encode(self, modality: Modality, original, call: dict):
        reader = feature_layer_reader(self.tower, _compat.vision_blocks(self.tower), call, self.config)
        out = original(**call) if reader is None else reader.capture(original, call)
        side = self.view_side()
        views, tokens = out.pooler_output.shape[:2]
        if tokens != side * side:
            raise RuntimeError(f"vtoken: unexpected InternVL view layout ({tokens} tokens, expected {side}x{side})")
        contexts = [ImageContext(n=tokens, segments=[GridSegment(0, side, side)]) for _ in range(views)]
        if reader is not None:
            maps = functools.cache(functools.partial(self.token_maps, reader))
            for view, context in enumerate(contexts):
                context.tower = functools.cache(functools.partial(tower_of_view, maps, view, reader.source))
                context.pivot_scores = functools.partial(attention_of, context.tower)
        return out, contexts

    def token_maps(self, reader: TowerReader) -> torch.Tensor | None:
        """(views, side * side, 1 + d) the tower's attention and keys per token after the pixel shuffle: each token's
        2 x 2 patches (attention summed, keys averaged)."""
        maps = reader.view_maps()
        side = self.view_side()
        if maps is None or maps.shape[1] < 4 * side * side:
            return None
        maps = maps[:, maps.shape[1] - 4 * side * side:]  # the [CLS] token is not a patch
        return merge_patches(maps.view(maps.shape[0], side, 2, side, 2, -1), (2, 4)).flatten(1, 2)

    def group_items(self, modality: Modality, kwargs: dict, encoded):
        """An image's tiles (or a video frame) as one item, so a budget applies per image as on the other hosts. The
        call does not say which views form one image, but the prompt does: each image is one run of placeholders
        between its ``<img>`` and ``</img>`` markers, a whole number of views long."""
        views = list(encoded.pooler_output)
        size = views[0].shape[0]
        if len(views) < 2 or any(id(v) not in self.items or v.shape[0] != size or self.items[id(v)].n != size
                                  for v in views):
            return encoded, None  # one view is one image; foreign features are refused by reduce_items
        runs = placeholder_runs(self.placeholder_mask(kwargs, modality), len(views))
        lengths = None if runs is None else [n for _, n in runs]
        if lengths is None or sum(lengths) != size * len(views) or any(n % size for n in lengths):
            held = "more runs of image tokens than views" if runs is None else f"image tokens in runs of {lengths}"
            raise ValueError(
                f"Image features and image tokens do not match: the prompt holds {held}, the inputs give {len(views)} "
                f"views (tiles or frames) of {size} tokens; each image's run of image tokens must hold its views' "
                "tokens. When a turn continues a KV cache, pass pixel_values for the new tokens' images only.")
        grouped, first = copy.copy(encoded), 0
        grouped.pooler_output = []
        for n in lengths:
            grouped.pooler_output.append(self.joined(views[first: first + n // size]))
            first += n // size
        return grouped, [row for row, _ in runs]

    def packed(self, modality: Modality, output):
        # the model scatters its features into the placeholders in order, whatever their shape
        if not torch.is_tensor(output.pooler_output):
            output.pooler_output = torch.cat(list(output.pooler_output))
        return output


def tower_of_view(maps, view: int, source: str) -> TowerTokens | None:
    token_maps = maps()
    return None if token_maps is None else tower_tokens(token_maps[view], source)


def attention_of(tower) -> torch.Tensor | None:
    """ToDRE's pivot scores: the [CLS] attention on each token (the tower's attention, which on InternViT is the
    [CLS] token's)."""
    mapped = tower()
    return None if mapped is None or mapped.source != "cls" else mapped.attention


register_host("internvl", "transformers InternVLForConditionalGeneration (InternVL3 / 3.5), images as tiles and "
              "videos as frames", matches=is_internvl,
              installers={"boundary": InternVLPatch.install, "in_llm": InternVLPatch.install,
                          "tower_attention": InternVLPatch.install})

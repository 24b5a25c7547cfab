"""Hugging Face InternVL (``InternVLForConditionalGeneration``: InternVL3 / 3.5), transformers 5.x.

The hooks are the shared :class:`~vtoken.adapters.vlm.host.VLMPatch`; this file says where InternVL keeps things:

* the processor cuts an image into tiles (a grid of 448 px tiles plus a thumbnail) and a video into frames, each
  one view of the vision tower; ``get_image_features`` returns every view's tokens, a pixel-shuffled square grid
  (16 x 16 = 256 at 448 px), with nothing in the model's call saying which views form one image. vtoken therefore
  reduces each view on its own: a budget applies per tile or frame (a fraction keeps the same share of every image);
* positions are 1-D (Qwen2.5 / InternLM3 RoPE), renumbered like a processor's shorter prompt, as on LLaVA.

ToDRE's pivot is a seeded random token here (the tower's [CLS] attention is not read yet), and VisionZip does not run.
"""

from __future__ import annotations

import torch

from vtoken.adapters import _compat
from vtoken.adapters.vlm.host import Modality, VLMPatch
from vtoken.methods.base import GridSegment, ImageContext
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
        out = original(**call)
        side = self.view_side()
        views, tokens = out.pooler_output.shape[:2]
        if tokens != side * side:
            raise RuntimeError(f"vtoken: unexpected InternVL view layout ({tokens} tokens, expected {side}x{side})")
        return out, [ImageContext(n=tokens, segments=[GridSegment(0, side, side)]) for _ in range(views)]

    def packed(self, modality: Modality, output):
        # the model scatters its features into the placeholders in order, whatever their shape
        if not torch.is_tensor(output.pooler_output):
            output.pooler_output = torch.cat(list(output.pooler_output))
        return output


register_host("internvl", "transformers InternVLForConditionalGeneration (InternVL3 / 3.5), images as tiles and "
              "videos as frames", matches=is_internvl,
              installers={"boundary": InternVLPatch.install, "in_llm": InternVLPatch.install})

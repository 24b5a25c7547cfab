"""ViT backbones: timm ``VisionTransformer``, Hugging Face CLIP vision towers, open_clip ``VisionTransformer``.

This adapter says where each family keeps its blocks, its patch embedding and its prefix tokens (a :class:`VitSite`);
what runs inside the blocks comes from a bridge (token clustering: ``adapters/bridges/vit_clustering.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from vtoken.adapters import _compat
from vtoken.registry import register_host

Grid = tuple[int, int]


@dataclass(frozen=True)
class VitSite:
    """Where one ViT keeps its blocks, its patch grid and its prefix tokens."""

    root: nn.Module  # the ViT itself; the patch is claimed on it
    blocks: Sequence[nn.Module]
    patch_conv: nn.Module | None  # output (B, C, H, W): the grid of the current input
    num_prefix: int
    nominal_grid: Grid
    batch_first: bool = True
    intermediates: nn.Module | None = None  # the module with timm / open_clip ``forward_intermediates``


# -- hosts ----------------------------------------------------------------------------------------------------------
def _defined_in(model, package: str, name: str) -> bool:
    return any(c.__name__ == name and c.__module__.startswith(package + ".") for c in type(model).__mro__)


def is_timm_vit(model) -> bool:
    return _defined_in(model, "timm", "VisionTransformer")


def timm_site(model) -> VitSite:
    parts = _compat.timm_vit_parts(model)
    return VitSite(root=model, blocks=parts["blocks"], patch_conv=parts["patch_conv"], num_prefix=parts["num_prefix"],
                   nominal_grid=parts["grid"], intermediates=model)


HF_CLIP_CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPVisionTransformer", "CLIPModel")


def hf_clip_tower(model) -> nn.Module | None:
    """The module holding ``embeddings`` + ``encoder``: CLIPVisionModel (transformers 5), CLIPVisionTransformer (4)."""
    if not any(_defined_in(model, "transformers", name) for name in HF_CLIP_CLASSES):
        return None
    tower = _compat.vision_encoder(model)
    return tower if hasattr(tower, "embeddings") and hasattr(tower, "encoder") else None


def hf_clip_site(model) -> VitSite:
    tower = hf_clip_tower(model)
    embeddings, layers, has_cls = _compat.clip_parts(tower)
    side = embeddings.image_size // embeddings.patch_size
    return VitSite(root=tower, blocks=layers, patch_conv=embeddings.patch_embedding, num_prefix=int(has_cls),
                   nominal_grid=(side, side))


def open_clip_visual(model) -> nn.Module | None:
    for candidate in (model, getattr(model, "visual", None)):
        if candidate is not None and _defined_in(candidate, "open_clip", "VisionTransformer"):
            return candidate
    return None


def open_clip_site(model) -> VitSite:
    visual = open_clip_visual(model)
    parts = _compat.open_clip_parts(visual)
    return VitSite(root=visual, blocks=parts["blocks"], patch_conv=parts["patch_conv"], num_prefix=parts["num_prefix"],
                   nominal_grid=parts["grid"], batch_first=parts["batch_first"], intermediates=visual)


# host -> (what it is, how to recognise one, where its blocks are); the stages come from bridges (adapters/bridges)
SITES = {
    "timm_vit": ("timm VisionTransformer (ViT, DeiT, CLIP-style ViTs in timm)", is_timm_vit, timm_site),
    "hf_clip_vision": ("transformers CLIPVisionModel / CLIPVisionModelWithProjection / CLIPModel (its vision tower), "
                       "e.g. llava.model.vision_tower", lambda model: hf_clip_tower(model) is not None, hf_clip_site),
    "open_clip_vit": ("open_clip VisionTransformer, or an open_clip CLIP model (its .visual)",
                      lambda model: open_clip_visual(model) is not None, open_clip_site),
}
for _name, (_description, _matches, _) in SITES.items():
    register_host(_name, _description, _matches, installers={})

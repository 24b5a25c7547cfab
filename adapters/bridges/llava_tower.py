"""Token clustering in LLaVA-1.5's CLIP tower: the vision-blocks stage on the LLaVA host.

``reconstruct=True``: the tower maps back to every patch by the layer LLaVA reads (``reconstruct_after`` defaults to
``vision_feature_layer``), so the prompt is unchanged and only the tower gets cheaper. ``reconstruct=False``: the LLM
gets the M cluster tokens per image and the prompt is shortened to match (a feature provider of the shared patch).
"""

from __future__ import annotations

import dataclasses

from vtoken.adapters import _compat
from vtoken.adapters.bridges.vit_clustering import install_hf_clip
from vtoken.adapters.llava import LlavaPatch
from vtoken.adapters.vlm.host import FeatureProvider
from vtoken.handle import Handle
from vtoken.methods.clustering import MIN_DEPTH
from vtoken.registry import add_bridge


def install_clustered_tower(model, config, handle) -> None:
    """``token_clustering`` on a LLaVA: cluster inside the CLIP tower (see the module docstring)."""
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


add_bridge("llava", "token_clustering", install_clustered_tower)

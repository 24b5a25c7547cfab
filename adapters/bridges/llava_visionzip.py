"""VisionZip on HF LLaVA-1.5 as released: the LLM gets ``keep`` tokens per image, chosen and merged before the
projector, [CLS] included (the other hosts run VisionZip's boundary stage on the projected tokens instead).

Hook points, per instance (``handle.remove()`` undoes them):
* a forward pre-hook and a forward hook on the CLIP encoder layer whose output LLaVA reads (``vision_feature_layer``)
  keep that layer's input (for its [CLS] attention and keys, recomputed from it) and its output ([CLS] included);
* the ``forward`` of ``model.model.multi_modal_projector`` is shadowed on that instance by :class:`ZippedProjector`,
  which projects VisionZip's tokens of that output instead of the features it is handed;
* the shared :class:`~vtoken.adapters.llava.LlavaPatch` takes it as a feature provider: the prompt keeps the
  processor's placeholders, the features are zero-padded to them for ``generate()``'s bookkeeping, and the prompt
  is shortened to the real count before the LLM runs (the same path as TokenFLEX).
"""

from __future__ import annotations

import torch

from vtoken.adapters import _compat
from vtoken.adapters.llava import LlavaPatch
from vtoken.adapters.vlm.host import FeatureProvider
from vtoken.adapters.vlm.tower import view_maps
from vtoken.methods.visionzip import VisionZipConfig, visionzip_tokens
from vtoken.registry import add_bridge
from vtoken.timing import Stopwatch


class ZippedProjector:
    """What the host's projector computes while VisionZip is on: the projection of VisionZip's tokens of the
    captured layer output, (views, keep, C_llm)."""

    def __init__(self, host_projector, layer, config: VisionZipConfig, patches: int):
        self.host_forward = type(host_projector).forward.__get__(host_projector)  # the class's own, not the shadow
        self.layer, self.config, self.patches = layer, config, patches
        self.captured: dict[str, torch.Tensor] = {}
        self.selection = Stopwatch()

    def grab_input(self, module, args, kwargs):
        self.captured["x"] = args[0] if args else kwargs["hidden_states"]

    def grab_output(self, module, args, kwargs, output):
        self.captured["y"] = output[0] if isinstance(output, tuple) else output

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        x, y = self.captured.pop("x", None), self.captured.pop("y", None)
        if x is None or y is None or y.shape[0] != features.shape[0]:
            raise RuntimeError("visionzip: the projector was called on features the patched vision layer did not "
                               "produce in this call; call the model (or get_image_features) with pixel_values")
        dominant, contextual = self.config.split(self.patches)
        with self.selection(y.device):
            maps = view_maps(self.layer, x, from_cls=True)
            tokens = visionzip_tokens(y, maps[..., 0], maps[..., 1:], dominant, contextual)
        return self.host_forward(tokens)


def install_visionzip(model, config: VisionZipConfig, handle) -> None:
    _, tower = _compat.decoder_of(model.model)
    layers = _compat.clip_parts(tower)[1]
    feature_layer = model.config.vision_feature_layer
    if isinstance(feature_layer, (list, tuple)):
        raise ValueError(f"visionzip reads one vision layer, but this LLaVA concatenates {feature_layer}")
    if not _compat.has_cls_token(tower):
        raise ValueError("visionzip ranks patches by the vision tower's [CLS] attention; this tower has no [CLS]")
    index = len(layers) + feature_layer if feature_layer < 0 else feature_layer - 1
    if not 0 <= index < len(layers):
        raise ValueError(f"visionzip: vision_feature_layer={feature_layer} is not the output of an encoder layer "
                         f"of this {len(layers)}-layer tower")
    vc = model.config.vision_config
    # the features LLaVA hands its projector per image: [CLS] too under 'full'
    tokens = (vc.image_size // vc.patch_size) ** 2 + int(model.config.vision_feature_select_strategy == "full")
    config.split(tokens)  # a budget this tower cannot give is refused before anything changes
    zipped = ZippedProjector(_compat.projector_of(model.model), layers[index], config, tokens)
    patch = LlavaPatch.of(model)
    patch.attach_provider(FeatureProvider("visionzip", selection=zipped.selection), handle)
    handle.forward_pre_hook(layers[index], zipped.grab_input, with_kwargs=True)
    handle.forward_hook(layers[index], zipped.grab_output, with_kwargs=True)
    handle.set_attr(_compat.projector_of(model.model), "forward", zipped)


add_bridge("llava", "visionzip", install_visionzip)

"""TokenFLEX on HF LLaVA-1.5 and LLaVA-NeXT (the projector stage of both hosts): the LLM gets exactly N visual tokens
per image view.

Hook points, per instance (``handle.remove()`` undoes them):
* the ``forward`` of ``model.model.multi_modal_projector`` is shadowed on that instance by :class:`PooledProjector`:
  each view's patch grid is pooled to ``n x n`` (``n = sqrt(N)``), then projected by the trained TokenFLEX
  projector, or by the model's own projector in the training-free mode. The model's weights and ``state_dict`` stay
  as they are. (Shadowing the module's ``forward`` rather than the ``multi_modal_projector`` attribute keeps the
  change visible to ``torch.compile``, whose guards read a submodule through ``_modules`` but do read ``forward``.)
* LLaVA-NeXT only: ``model.model.pack_image_features`` is shadowed by :func:`pack_views`, LLaVA-NeXT's own AnyRes
  packing on ``n x n`` views (its version assumes the tower's full grid).
* The shared :class:`~vtoken.adapters.llava.LlavaPatch` takes it as a feature provider: the prompt keeps the
  processor's usual placeholders, the features are zero-padded to them for ``generate()``'s bookkeeping, and the
  prompt is shortened to the real count before the LLM runs (the same path as a clustering tower).

LLaVA-NeXT's AnyRes layout with N tokens per view: every view (the thumbnail and each high-resolution tile) is pooled
to ``n x n``. The thumbnail gives N tokens. The tiles form a ``(tiles_high * n) x (tiles_wide * n)`` grid that is
unpadded exactly as LLaVA-NeXT unpads the full-resolution grid (the same integer rule at side n, so the padding
the processor added around the image is cut at the pooled resolution), and each of its rows keeps one
``image_newline`` token. So an image holds ``N + rows * (cols + 1)`` tokens with ``rows * cols <= tiles * N``; at
the native N this is exactly the model's own layout (tests check it equals the unpatched model).
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from torch import nn

from vtoken.adapters import _compat
from vtoken.adapters.llava import LlavaPatch, best_resolution, is_llava, is_llava_next, unpadded_grid
from vtoken.adapters.vlm.host import FeatureProvider
from vtoken.methods.tokenflex import TokenFlexConfig, TokenFlexProjector, pool_grid, resolve_num_tokens
from vtoken.registry import add_bridge

_UNSET = object()


class PooledProjector:
    """What the host's projector computes while TokenFLEX is on: (views, L, C_v) -> (views, N, C_llm).

    Installed as the host projector's ``forward`` on the instance. A user's trained projector is never changed: when
    the features come in another device or dtype, a cast copy computes instead, made again when the user's weights
    change (their in-place version counters move, as an optimizer step moves them).
    """

    def __init__(self, host_projector: nn.Module, num_tokens: int):
        self.host_forward = type(host_projector).forward.__get__(host_projector)  # the class's own, not the shadow
        self.num_tokens = num_tokens
        self.trained: TokenFlexProjector | None = None
        self.source = _UNSET  # the config's projector value ``trained`` was made from
        self._cast: tuple[tuple, TokenFlexProjector] | None = None  # (what it was cast from, the copy)

    @property
    def side(self) -> int:
        return math.isqrt(self.num_tokens)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if self.trained is None:
            return self.host_forward(pool_grid(features, self.num_tokens))
        return self.projector_for(features)(features, self.num_tokens)

    def projector_for(self, features: torch.Tensor) -> TokenFlexProjector:
        weight = self.trained.down.weight
        if weight.device == features.device and weight.dtype == features.dtype:
            return self.trained
        key = (features.device, features.dtype, id(self.trained), tuple(p._version for p in self.trained.parameters()))
        if self._cast is None or self._cast[0] != key:
            self._cast = key, copy.deepcopy(self.trained).to(features.device, features.dtype)
        return self._cast[1]


def pack_image(views: torch.Tensor, image_size, pinpoints, tile: int, newline: torch.Tensor | None) -> torch.Tensor:
    """One image's ``(views, n*n, C)`` features in LLaVA-NeXT's order: the thumbnail, then the unpadded grid of the
    high-resolution tiles (AnyRes always has at least one) with one ``newline`` per row."""
    size = list(image_size)
    _, N, C = views.shape
    n = math.isqrt(N)
    base = views[0]
    high, wide = (s // tile for s in best_resolution(size, pinpoints))
    grid = views[1:].view(high, wide, n, n, C).permute(4, 0, 2, 1, 3).reshape(C, high * n, wide * n)
    rows, cols = unpadded_grid(size, pinpoints, tile, n)
    top, left = (high * n - rows) // 2, (wide * n - cols) // 2
    grid = grid[:, top : top + rows, left : left + cols]
    if newline is not None:
        grid = torch.cat([grid, newline[:, None, None].to(grid).expand(C, rows, 1)], dim=-1)
    return torch.cat([base, grid.flatten(1).T])


def pack_views(config, host_sizes, image_features, image_sizes, vision_feature_select_strategy=None,
               image_newline=None):
    """``pack_image_features`` for pooled views: (per-image features, their lengths); ``host_sizes`` reads the image
    sizes to the host once."""
    tile = config.vision_config.image_size
    packed = [pack_image(views, size, config.image_grid_pinpoints, tile, image_newline)
              for views, size in zip(image_features, host_sizes(image_sizes))]
    lengths = torch.tensor([p.shape[0] for p in packed], dtype=torch.long, device=packed[0].device)
    return packed, lengths


def feature_widths(config) -> tuple[int, int]:
    """(width of the vision features the projector reads, LLM width) of a LLaVA-like config."""
    layers = config.vision_feature_layer
    n_layers = len(layers) if isinstance(layers, (list, tuple)) else 1
    return config.vision_config.hidden_size * n_layers, config.text_config.hidden_size


def trainable_native_tokens(model) -> int:
    """Refuse what ``vtoken.training`` cannot train a projector for; returns the native tokens per view."""
    if not (is_llava(model) or is_llava_next(model)):
        raise ValueError(f"train_tokenflex trains on HF LLaVA / LLaVA-NeXT models; got {type(model).__name__}")
    if model.config.vision_feature_select_strategy == "full":
        raise ValueError("TokenFLEX pools the patch grid; this model feeds the [CLS] token too "
                         "(vision_feature_select_strategy='full'); only 'default' is supported")
    vc = model.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


def check_projector(projector: TokenFlexProjector, config) -> None:
    vision, llm = feature_widths(config)
    if (projector.vision_width, projector.llm_width) != (vision, llm):
        raise ValueError(
            f"projector maps {projector.vision_width}-wide vision features to a {projector.llm_width}-wide LLM, but "
            f"this model's projector reads {vision}-wide features and its LLM is {llm} wide; train a projector for "
            "this model (vtoken train-tokenflex) or use projector=None (training-free)"
        )


def install_tokenflex(model, config: TokenFlexConfig, handle) -> None:
    base, host = model.model, model.config
    if host.vision_feature_select_strategy == "full":
        raise ValueError(
            "tokenflex pools the patch grid, and this model feeds the vision tower's [CLS] token too "
            "(vision_feature_select_strategy='full'), which has no place in the grid; it supports 'default'"
        )
    vc = host.vision_config
    native = (vc.image_size // vc.patch_size) ** 2
    pooled = PooledProjector(_compat.projector_of(base), resolve_num_tokens(config.num_tokens, native))

    def configure(new: TokenFlexConfig) -> None:
        """Take ``new``'s count and projector, checked against the model before anything changes."""
        num_tokens = resolve_num_tokens(new.num_tokens, native)
        trained = pooled.trained
        if new.projector is not pooled.source:
            trained = new.load_projector()
            if trained is not None:
                check_projector(trained, host)
        pooled.num_tokens, pooled.trained, pooled.source = num_tokens, trained, new.projector
        pooled._cast = None

    configure(config)  # every check before the shared patch is made: a refusal leaves nothing behind
    patch = LlavaPatch.of(model)
    patch.attach_provider(FeatureProvider("tokenflex", view_side=lambda: pooled.side), handle)
    handle.set_attr(_compat.projector_of(base), "forward", pooled)
    if patch.next:
        handle.set_attr(base, _compat.PACK_FEATURES_ATTR, functools.partial(pack_views, host, patch.host_sizes))
    handle.on_update(configure)


for _host in ("llava", "llava_next"):
    add_bridge(_host, "tokenflex", install_tokenflex)

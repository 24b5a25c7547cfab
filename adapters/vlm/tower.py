"""The vision tower's attention and keys at the layer whose output the projector reads, for every host.

Hosts capture that layer's input while their encoder runs (:class:`TowerReader`, one forward pre-hook for the call)
and recompute from it what a method asks for, lazily and once per call: per view and patch, the attention the patch
receives and its key states averaged over heads (:func:`view_maps`). Each host then maps the per-view maps onto an
item's projected tokens with the same geometry its model applies to the features (:func:`tower_tokens` turns such a
map into the :class:`~vtoken.methods.base.TowerTokens` a method reads). The tower keeps SDPA: nothing asks for
``output_attentions``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtoken.adapters import _compat
from vtoken.methods.base import TowerTokens


def queries_and_keys(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(views, heads, T, head_dim) fp32 queries and keys of a vision encoder layer for its input ``x`` (views, T, C),
    and the layer's softmax scale."""
    attn = _compat.vision_attention(layer)
    h = attn.norm(x)
    views, T, _ = h.shape
    q, k = attn.q_proj(h), attn.k_proj(h)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    split = (views, T, attn.num_heads, attn.head_dim)
    return q.view(split).transpose(1, 2).float(), k.view(split).transpose(1, 2).float(), attn.scale


def view_maps(layer, x: torch.Tensor, from_cls: bool, chunk: int = 8) -> torch.Tensor:
    """(views, T, 1 + head_dim) fp32 per token of each view: the attention it receives, then its head-mean key.

    ``from_cls``: the [CLS] token's attention (a tower with one); otherwise each token's attention averaged over
    every query of its view and the heads, computed ``chunk`` views at a time (a view's full attention is T x T)."""
    q, k, scale = queries_and_keys(layer, x)
    if from_cls:
        attention = (q[:, :, :1] @ k.transpose(-1, -2) * scale).softmax(dim=-1).mean(dim=1)[:, 0]
    else:
        attention = torch.cat([(q[v:v + chunk] @ k[v:v + chunk].transpose(-1, -2) * scale).softmax(dim=-1)
                               .mean(dim=(1, 2)) for v in range(0, q.shape[0], chunk)])
    return torch.cat([attention.unsqueeze(-1), k.mean(dim=1)], dim=-1)


def cls_attention(layer, x: torch.Tensor) -> torch.Tensor:
    """(views, T) the [CLS] token's (token 0's) attention over all tokens, head-averaged fp32 softmax."""
    return view_maps(layer, x, from_cls=True)[..., 0]


def merge_patches(groups: torch.Tensor, dims) -> torch.Tensor:
    """Maps of patches merged into one token each (pixel shuffle, Qwen's merger): attention summed and keys
    averaged over the group dimensions ``dims`` of ``groups`` (..., 1 + d)."""
    return torch.cat([groups[..., :1].sum(dim=dims), groups[..., 1:].mean(dim=dims)], dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def segment_received(q: torch.Tensor, k: torch.Tensor, scale: float, cu_seqlens: torch.Tensor,
                     block: int = 1 << 24) -> torch.Tensor:
    """(S,) fp32 the attention each of S tokens receives, averaged over heads and over the queries of its segment,
    where queries attend only within their segment (``cu_seqlens`` (G + 1,) boundaries: Qwen's frames or windows).

    ``q``, ``k`` (S, H, d) fp32 with RoPE applied. As many query rows at a time as keep the scores within ``block``
    floats (64 MiB), against every key, with keys of other segments masked, so the segments' bounds are never read on
    the host."""
    S = q.shape[0]
    chunk = max(1, block // (q.shape[1] * S))
    positions = torch.arange(S, device=q.device)
    segment = torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)
    received = torch.zeros(S, dtype=torch.float32, device=q.device)
    for start in range(0, S, chunk):
        rows = slice(start, min(S, start + chunk))
        scores = torch.einsum("qhd,khd->hqk", q[rows], k) * scale
        scores = scores.masked_fill((segment[rows, None] != segment[None, :]).unsqueeze(0), float("-inf"))
        received += scores.softmax(dim=-1).mean(dim=0).sum(dim=0)
    return received / cu_seqlens.diff().to(received.dtype)[segment]


def anyres_grid(views: torch.Tensor, tiles: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """(rows, cols, K) the high-resolution crops of one image's per-view maps ``views`` (tiles, side * side, K)
    arranged as the model arranges their features: a ``tiles`` (down, across) grid of crops in raster order, the
    padding around the image cut away evenly on both sides to ``rows x cols``."""
    down, across = tiles
    side = int(views.shape[1] ** 0.5)
    grid = views.reshape(down, across, side, side, -1).permute(0, 2, 1, 3, 4).reshape(down * side, across * side, -1)
    top, left = (down * side - rows) // 2, (across * side - cols) // 2
    return grid[top:top + rows, left:left + cols]


def resize_grid(grid: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows, cols, K) a (r, c, K) map scaled bilinearly as the model scales its feature grid."""
    if grid.shape[:2] == (rows, cols):
        return grid
    return F.interpolate(grid.permute(2, 0, 1).unsqueeze(0), size=[rows, cols], mode="bilinear")[0].permute(1, 2, 0)


def place(n: int, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(n, K) an item's token map: each (indices (m,), rows (m, K)) part written at its token indices, NaN where no
    part writes (tokens without a patch of their own)."""
    width = parts[0][1].shape[-1]
    out = parts[0][1].new_full((n, width), float("nan"))
    for index, rows in parts:
        out[index.to(out.device)] = rows.reshape(-1, width)
    return out


def tower_tokens(token_map: torch.Tensor, source: str) -> TowerTokens:
    """The :class:`TowerTokens` of an item's (n, 1 + d) token map (NaN rows: tokens without a patch)."""
    missing = token_map[:, 0].isnan()
    attention = token_map[:, 0].masked_fill(missing, float("-inf"))
    return TowerTokens(attention=attention, keys=token_map[:, 1:].nan_to_num(0.0), source=source)


class TowerReader:
    """Captures, during one encoder call, the input of the vision layer whose output the projector reads, and
    computes its :func:`view_maps` once, when a method first asks."""

    def __init__(self, layer, from_cls: bool):
        self.layer, self.from_cls = layer, from_cls
        self.source = "cls" if from_cls else "received"
        self.input: torch.Tensor | None = None
        self.maps: torch.Tensor | None = None

    def grab(self, module, args, kwargs):
        self.input = args[0] if args else kwargs["hidden_states"]

    def capture(self, original, call: dict):
        """``original(**call)`` with the layer's input captured."""
        hook = self.layer.register_forward_pre_hook(self.grab, with_kwargs=True)
        try:
            return original(**call)
        finally:
            hook.remove()

    def view_maps(self) -> torch.Tensor | None:
        """(views, T, 1 + d) of the captured call (see :func:`view_maps`); None when nothing was captured."""
        if self.maps is None and self.input is not None:
            self.maps = view_maps(self.layer, self.input, self.from_cls)
            self.input = None  # the maps are all that is needed from it
        return self.maps


def feature_layer_reader(tower, layers, call: dict, config) -> TowerReader | None:
    """The reader of the encoder layer (of ``layers``) whose output a host reads, ``vision_feature_layer`` of the
    call or else of ``config``; None when the features are not one layer's output (the embeddings)."""
    feature_layer = call.get("vision_feature_layer")
    if feature_layer is None:
        feature_layer = config.vision_feature_layer
    index = feature_layer_index(feature_layer, len(layers))
    if not 0 <= index < len(layers):
        return None
    return TowerReader(layers[index], from_cls=_compat.has_cls_token(tower))


def feature_layer_index(feature_layer, depth: int) -> int:
    """Index of the encoder layer whose output a host reads as ``hidden_states[feature_layer]`` (the last one of a
    list); out of range when it is the embeddings."""
    layer = feature_layer[-1] if isinstance(feature_layer, (list, tuple)) else feature_layer
    return depth + layer if layer < 0 else layer - 1


__all__ = ["TowerReader", "anyres_grid", "cls_attention", "feature_layer_index", "feature_layer_reader",
           "merge_patches", "place", "queries_and_keys", "resize_grid", "rotate_half", "segment_received",
           "tower_tokens", "view_maps"]

"""Baselines under the same API as the published methods, so users compare on equal terms.

* ``random``   — a seeded random subset of the projected visual tokens (boundary).
* ``pool``     — 2-D adaptive average pooling of each patch grid (boundary).
* ``attn_topk`` — FastV: after decoder layer K, keep the visual tokens the last prompt token attends to most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtoken.budget import resolve_budget
from vtoken.kernels.dispatch import BACKENDS
from vtoken.methods.base import (
    GridSegment,
    ImageContext,
    LayerContext,
    Reduction,
    VisualTokenMethod,
    check_choice,
    check_int,
)
from vtoken.registry import register_method

VLM_HOSTS = ("llava", "llava_next", "qwen_vl")


@register_method("random", hosts=VLM_HOSTS)
@dataclass
class RandomConfig(VisualTokenMethod):
    """Keep a seeded random subset of each image's visual tokens (after the projector).

    The subset depends only on ``seed`` and the image's token count, never on the batch, so a batch gives the
    same tokens as single runs and a rerun gives the same tokens; change ``seed`` to draw another subset.
    """

    seed: int = 0
    boundary = True

    def __post_init__(self):
        super().__post_init__()
        check_int(self.seed, "seed", 0)

    def reduce(self, features: torch.Tensor, ctx: ImageContext) -> Reduction:
        k = resolve_budget(self.keep, ctx.n)
        gen = torch.Generator().manual_seed(self.seed)
        kept = torch.randperm(ctx.n, generator=gen)[:k].sort().values.to(features.device)
        return Reduction(features[kept], kept)


def pooled_grid(rows: int, cols: int, budget: int, newline: bool = False) -> tuple[int, int]:
    """Largest ``r x c`` grid with roughly the aspect of ``rows x cols`` whose tokens, plus one separator per row
    when ``newline``, fit in ``budget`` (never upsampling): ``r * (c + newline) <= budget``, ``1 <= r <= rows``,
    ``1 <= c <= cols``. The budget must hold at least one pooled token and its separator."""
    sep = int(newline)
    if rows < 1 or cols < 1:
        raise ValueError(f"a {rows}x{cols} grid has no patch to pool")
    if budget < 1 + sep:
        raise ValueError(f"budget={budget} cannot hold one pooled token" + (" and its row separator" if sep else ""))
    r = min(rows, max(1, round(math.sqrt(budget * rows / cols))))
    c = min(cols, max(1, budget // r - sep))
    r = min(rows, budget // (c + sep))  # >= 1: c + sep <= budget
    return r, c


def split_budget(k: int, sizes: list[int], minimums: list[int] | None = None) -> list[int]:
    """Share exactly ``k`` tokens among segments in proportion to their sizes (largest remainders), each getting at
    least its minimum (default 1; the shortfall is taken from the segment with the most to spare)."""
    minimums = [1] * len(sizes) if minimums is None else minimums
    if k < sum(minimums):
        raise ValueError(f"k={k} is smaller than the {sum(minimums)} tokens the segments need at least")
    total = sum(sizes)
    exact = [k * s / total for s in sizes]
    out = [int(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - out[i], reverse=True)
    for i in by_remainder[: k - sum(out)]:
        out[i] += 1
    for i in range(len(sizes)):
        while out[i] < minimums[i]:
            donor = max(range(len(sizes)), key=lambda j: out[j] - minimums[j])
            out[donor] -= 1
            out[i] += 1
    return out


def window_centers(size: int, bins: int) -> torch.Tensor:
    """The middle input index of each of adaptive pooling's ``bins`` windows over ``size`` inputs."""
    i = torch.arange(bins)
    start, end = (i * size) // bins, -((-(i + 1) * size) // bins)
    return (start + end - 1) // 2


@register_method("pool", hosts=VLM_HOSTS)
@dataclass
class PoolConfig(VisualTokenMethod):
    """2-D adaptive average pooling of each patch grid to about ``keep`` tokens (after the projector).

    The pooled grid keeps the image's aspect ratio, so it holds ``r x c <= keep`` tokens (64 -> 8x8, 58 -> 8x7);
    ``handle.stats`` reports the exact count, which never exceeds ``keep``. LLaVA-NeXT's layout is preserved: the
    thumbnail and the high-resolution grid share the budget in proportion to their sizes, each pooled row of the
    high-resolution grid keeps its ``image_newline`` separator, and tokens outside any grid are kept as they are.
    A video is one grid per frame, each pooled alone; ``temporal=True`` first averages consecutive frame pairs
    (2x2x2 pooling where the budget allows 2x2). Each pooled token takes the place (and, on hosts that keep
    original positions, the position) of the token in the middle of its window.

    Edge cases, so that the budget always holds and keep-all is the identity:
    * a budget that keeps every token returns the input unchanged;
    * a grid with no patches (an extreme aspect ratio unpads LLaVA-NeXT's high-resolution grid to 0 columns or
      0 rows, leaving only separators) has nothing to pool and is dropped with its separators;
    * a budget too small for one pooled token per grid (plus a separator for the high-resolution grid, 3 tokens
      in all) drops grids from the last one on: the thumbnail gets the whole budget. Tokens outside any grid are
      kept only where the budget has room for them after the first grid's one token.
    """

    temporal: bool = False
    boundary = True

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.temporal, "temporal", (True, False))

    def reduce(self, features: torch.Tensor, ctx: ImageContext) -> Reduction:
        k = resolve_budget(self.keep, ctx.n)
        if k >= ctx.n:
            return Reduction(features, None)
        covered = torch.zeros(ctx.n, dtype=torch.bool)
        for seg in ctx.segments:
            covered[seg.start : seg.start + seg.length] = True
        extras = (~covered).nonzero().squeeze(1).tolist()
        grids: list[list[GridSegment]] = [[s] for s in ctx.segments if s.rows and s.cols]
        if self.temporal and ctx.frames is not None:  # frame pairs pooled together
            grids = [sum(grids[i : i + 2], []) for i in range(0, len(grids), 2)]
        need = [1 + int(g[0].newline) for g in grids]  # one pooled token, and its separator
        while len(grids) > 1 and sum(need) + len(extras) > k:
            grids, need = grids[:-1], need[:-1]
        extras = extras[: max(0, k - sum(need))]
        budgets = split_budget(k - len(extras), [sum(s.length for s in g) for g in grids], need)
        pieces = [(i, features[i : i + 1], torch.tensor([i])) for i in extras]
        for group, budget in zip(grids, budgets):
            seg = group[0]
            index = seg.patch_index()
            grid = torch.stack([features[s.patch_index().to(features.device)] for s in group]).float().mean(0)
            r, c = pooled_grid(seg.rows, seg.cols, budget, seg.newline)
            out = F.adaptive_avg_pool2d(grid.permute(2, 0, 1), (r, c)).permute(1, 2, 0).to(features.dtype)
            rows, cols = window_centers(seg.rows, r), window_centers(seg.cols, c)
            anchors = index[rows][:, cols]
            if seg.newline:
                separator = features[seg.start + seg.cols].expand(r, 1, -1)
                out = torch.cat([out, separator], dim=1)
                anchors = torch.cat([anchors, (index[rows, -1] + 1).unsqueeze(1)], dim=1)
            pieces.append((seg.start, out.reshape(-1, features.shape[-1]), anchors.reshape(-1)))
        pieces.sort(key=lambda piece: piece[0])
        anchors = torch.cat([a for _, _, a in pieces])
        frames = None if ctx.frames is None else ctx.frames[anchors]
        return Reduction(torch.cat([p for _, p, _ in pieces]), None, frames=frames, anchors=anchors)


@register_method("attn_topk", hosts=VLM_HOSTS)
@dataclass
class AttnTopKConfig(VisualTokenMethod):
    """FastV: after decoder layer K, keep the visual tokens the last prompt token attends to most.

    Attention is head-averaged and measured in layer K-1 (``layer`` = K); defaults are FastV's K=2, R=50%.
    ``backend`` picks the kernels of the scoring and the compaction: ``"auto"`` = Triton on CUDA, PyTorch
    elsewhere; ``"torch"`` / ``"triton"`` force one (both keep the same tokens).
    """

    keep: int | float = 0.5
    layer: int = 2
    backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        check_int(self.layer, "layer", 1)
        check_choice(self.backend, "backend", BACKENDS)

    def score_layers(self, num_layers: int) -> tuple[int, ...]:
        check_int(self.layer, "layer", 1, num_layers - 1)
        return (self.layer - 1,)

    def prune(self, ctx: LayerContext) -> torch.Tensor:
        last = ctx.last_index().unsqueeze(1)  # (B, 1)
        attn = ctx.received(last, torch.ones_like(last, dtype=torch.float32))  # (B, L), head-averaged
        return keep_top_visual(attn, ctx, self.keep)


def keep_top_visual(scores: torch.Tensor, ctx: LayerContext, keep) -> torch.Tensor:
    """(B, L) mask keeping every non-visual token plus the ``keep`` best-scoring visual tokens per sample."""
    budgets = torch.tensor(
        [resolve_budget(keep, int(n)) for n in ctx.n_visual_input.tolist()], device=scores.device
    )
    return keep_top_count(scores, ctx.visual, budgets)


def keep_top_count(scores: torch.Tensor, visual: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, L) mask keeping every non-visual token plus the ``counts`` (B,) best-scoring visual tokens per sample;
    among equal scores the earlier token wins, so a batch and its single runs agree."""
    masked = torch.where(visual, scores.float(), float("-inf"))
    order = masked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ~visual | (rank < counts.to(rank.device).unsqueeze(1))

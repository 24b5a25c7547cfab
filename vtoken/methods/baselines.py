"""Baselines under the same API as the published methods, so users compare on equal terms.

* ``random``   — a seeded random subset of the projected visual tokens (boundary).
* ``pool``     — 2-D adaptive average pooling of each patch grid (boundary).
* ``attn_topk`` — FastV: after decoder layer K, keep the visual tokens the last prompt token attends to most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from vtoken.budget import resolve_budget
from vtoken.checks import check_choice, check_int
from vtoken.kernels.dispatch import BACKENDS
from vtoken.methods.base import GridSegment, ImageContext, LayerContext, Reduction, VisualTokenMethod
from vtoken.registry import register_method


@register_method("random", stages=("boundary",))
@dataclass
class RandomConfig(VisualTokenMethod):
    """Keep a seeded random subset of each image's visual tokens (after the projector).

    The subset depends only on ``seed`` and the image's token count, never on the batch, so a batch gives the
    same tokens as single runs and a rerun gives the same tokens; change ``seed`` to draw another subset.
    """

    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_int(self.seed, "seed", 0)

    def reduce(self, features: torch.Tensor, ctx: ImageContext) -> Reduction:
        kept = self.subset(ctx.n, features.device)
        return Reduction(features.index_select(0, kept), kept)

    def subset(self, n: int, device: torch.device) -> torch.Tensor:
        """The sorted indices kept of ``n`` tokens, drawn once per count and device (a copy to the device each call
        would stall it)."""
        cache = self.__dict__.setdefault("_subsets", {})
        key = (n, resolve_budget(self.keep, n), self.seed, str(device))
        if key not in cache:
            gen = torch.Generator().manual_seed(self.seed)
            cache[key] = torch.randperm(n, generator=gen)[: key[1]].sort().values.to(device)
        return cache[key]


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


@register_method("pool", stages=("boundary",))
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

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.temporal, "temporal", (True, False))

    def reduce(self, features: torch.Tensor, ctx: ImageContext) -> Reduction:
        k = resolve_budget(self.keep, ctx.n)
        if k >= ctx.n:
            return Reduction(features, None)
        plan = self.plan(ctx, k, features.device)
        pieces = []
        for piece in plan.pieces:
            if piece.rows == 0:  # a token outside every grid, kept as it is
                pieces.append(features.narrow(0, piece.start, 1))
                continue
            grid = features.index_select(0, piece.index).view(-1, piece.rows, piece.cols, features.shape[-1])
            grid = grid.float().mean(0).permute(2, 0, 1)
            out = F.adaptive_avg_pool2d(grid, piece.pooled).permute(1, 2, 0).to(features.dtype)
            if piece.separator is not None:
                out = torch.cat([out, features[piece.separator].expand(piece.pooled[0], 1, -1)], dim=1)
            pieces.append(out.reshape(-1, features.shape[-1]))
        frames = None if ctx.frames is None else ctx.frames[plan.anchors]
        return Reduction(torch.cat(pieces), None, frames=frames, anchors=plan.anchors)

    def plan(self, ctx: ImageContext, k: int, device: torch.device) -> PoolPlan:
        """What pooling an image of this layout to ``k`` tokens takes, worked out once per layout, budget and device
        (every index a device tensor made once: a pooled image then costs a few ops and no copy)."""
        plans = self.__dict__.setdefault("_plans", {})
        key = (ctx.n, tuple(ctx.segments), ctx.frames is not None, k, str(device))
        if key not in plans:
            plans[key] = pool_plan(ctx.n, ctx.segments, self.temporal and ctx.frames is not None, k, device)
        return plans[key]


class PoolPiece(NamedTuple):
    start: int  # its first input token (pieces come in this order)
    rows: int  # the patch grid's size; 0 for a token outside every grid
    cols: int
    index: torch.Tensor | None  # the grid's patch tokens (frames of a pair one after the other), on the device
    pooled: tuple[int, int]  # the pooled grid
    separator: int | None  # the token that follows every pooled row (LLaVA-NeXT's image_newline)


class PoolPlan(NamedTuple):
    pieces: list[PoolPiece]
    anchors: torch.Tensor  # per output token, the input token whose place it takes


def pool_plan(n: int, segments: list[GridSegment], pairs: bool, k: int, device: torch.device) -> PoolPlan:
    """The plan of :class:`PoolConfig`'s rules (host arithmetic, then one copy of each index to the device)."""
    covered = set()
    for seg in segments:
        covered.update(range(seg.start, seg.start + seg.length))
    extras = [i for i in range(n) if i not in covered]
    grids: list[list[GridSegment]] = [[s] for s in segments if s.rows and s.cols]
    if pairs:  # frame pairs pooled together
        grids = [sum(grids[i : i + 2], []) for i in range(0, len(grids), 2)]
    need = [1 + int(g[0].newline) for g in grids]  # one pooled token, and its separator
    while len(grids) > 1 and sum(need) + len(extras) > k:
        grids, need = grids[:-1], need[:-1]
    extras = extras[: max(0, k - sum(need))]
    budgets = split_budget(k - len(extras), [sum(s.length for s in g) for g in grids], need)
    pieces = [(PoolPiece(i, 0, 0, None, (1, 1), None), [i]) for i in extras]
    for group, budget in zip(grids, budgets):
        seg = group[0]
        stride = seg.cols + int(seg.newline)
        patch = [[s.start + r * stride + c for r in range(s.rows) for c in range(s.cols)] for s in group]
        r, c = pooled_grid(seg.rows, seg.cols, budget, seg.newline)
        rows, cols = window_centers(seg.rows, r).tolist(), window_centers(seg.cols, c).tolist()
        anchors = [[seg.start + i * stride + j for j in cols] + ([seg.start + i * stride + seg.cols] if seg.newline
                                                                 else []) for i in rows]
        index = torch.tensor(sum(patch, []), device=device)
        separator = seg.start + seg.cols if seg.newline else None
        pieces.append((PoolPiece(seg.start, seg.rows, seg.cols, index, (r, c), separator), sum(anchors, [])))
    pieces.sort(key=lambda piece: piece[0].start)
    return PoolPlan([p for p, _ in pieces], torch.tensor(sum((a for _, a in pieces), []), device=device))


@register_method("attn_topk", stages=("in_llm",))
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
    """(B, L) mask keeping every non-visual token plus the ``keep`` best-scoring visual tokens per sample (the
    budget of each resolved on the host from the visual tokens it fed the LLM, and reported in ``ctx.kept``)."""
    budgets = [resolve_budget(keep, n) for n in ctx.n_visual_input]
    ctx.kept = budgets
    return keep_top_count(scores, ctx.visual, budgets)


def keep_top_count(scores: torch.Tensor, visual: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(B, L) mask keeping every non-visual token plus the ``counts`` (per sample) best-scoring visual tokens; among
    equal scores the earlier token wins, so a batch and its single runs agree."""
    masked = torch.where(visual, scores.float(), float("-inf"))
    order = masked.argsort(dim=1, descending=True, stable=True)
    if len(set(counts)) == 1:  # one budget for every row: the top slots of the order
        top = order[:, : counts[0]]
    else:
        top = order[:, : max(counts)]
        top = torch.where(torch.arange(top.shape[1], device=top.device) < torch.tensor(counts, device=top.device)
                          .unsqueeze(1), top, top[:, :1])
    return (~visual).scatter(1, top, True) if top.shape[1] else ~visual

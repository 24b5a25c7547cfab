"""Greedy diversity selection of each image's projected tokens, the boundary stage shared by ToDRE and DivPrune."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vtoken.budget import Budget, resolve_budget
from vtoken.kernels.diversity import greedy_select
from vtoken.methods.base import ImageContext, Reduction

# pivots(x, members) -> (B,) first picks, given the L2-normalised fp32 features x (B, n, D) of images[members]
PivotRule = Callable[[torch.Tensor, list[int]], torch.Tensor]


def diverse_reductions(images: list[tuple[torch.Tensor, ImageContext]], keep: Budget, pivots: PivotRule,
                       rule: str, backend: str) -> list[Reduction]:
    """Keep ``keep`` tokens of each image by greedy selection (``rule`` as in ``greedy_select``) from its pivot.

    Images with the same token count are selected together: the k greedy steps run once for all of them. Kept
    tokens come back in raster order (the order the LLM was trained on); a budget that keeps everything returns
    the input as it is, without computing a pivot.
    """
    out: list[Reduction | None] = [None] * len(images)
    groups: dict[int, list[int]] = {}
    for i, (_, ctx) in enumerate(images):
        groups.setdefault(ctx.n, []).append(i)
    for n, members in groups.items():
        k = resolve_budget(keep, n)
        if k >= n:
            for i in members:
                out[i] = Reduction(images[i][0], torch.arange(n, device=images[i][0].device))
            continue
        features = torch.stack([images[i][0] for i in members])
        x = F.normalize(features.float(), dim=-1)
        kept = greedy_select(x, k, pivots(x, members), rule, backend).sort(dim=1).values
        for row, i in enumerate(members):
            out[i] = Reduction(features[row][kept[row]], kept[row])
    return out

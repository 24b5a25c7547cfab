"""Greedy diversity selection of each image's projected tokens, the boundary stage shared by ToDRE and DivPrune."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vtoken.budget import Budget, resolve_budget
from vtoken.kernels.diversity import cosine_similarities, greedy_select, selects_from_gram
from vtoken.methods.base import ImageContext, Reduction

# pivots(features, gram, members) -> (B,) first picks, given the stacked features (B, n, D) of images[members] and,
# where the selection reads them off the whole matrix, their cosine similarities (B, n, n) (else None)
PivotRule = Callable[[torch.Tensor, torch.Tensor | None, list[int]], torch.Tensor]


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
        gram = cosine_similarities(features, features) if selects_from_gram(features, backend) else None
        kept = greedy_select(features, k, pivots(features, gram, members), rule, backend, gram).sort(dim=1).values
        for row, i in enumerate(members):
            out[i] = Reduction(features[row][kept[row]], kept[row])
    return out

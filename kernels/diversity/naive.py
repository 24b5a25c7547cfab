"""PyTorch definitions of greedy diversity selection (ToDRE stage 1), the references of the Triton kernel.

Rows of ``x`` are L2-normalised, so ``x @ x[c]`` are cosine similarities. Both rules start from a pivot and add one
token per step; they differ in what "far from the kept set" means:
* max-sum (ToDRE v2): the smallest *summed* similarity to the kept tokens;
* max-min (greedy k-center, ToDRE v1): the largest distance ``1 - cos`` to the *nearest* kept token.
Batched over images of one length: (B, n, ...) in, (B, k) indices in pick order out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def greedy(similarity_to: Callable[[torch.Tensor], torch.Tensor], B: int, n: int, k: int, pivot: torch.Tensor,
           maxmin: bool, device: torch.device) -> torch.Tensor:
    """The greedy loop; ``similarity_to(cur)`` gives the (B, n) similarities of every token to the tokens ``cur``."""
    k = min(k, n)
    rows = torch.arange(B, device=device)
    picked = torch.empty(B, k, dtype=torch.long, device=device)
    cur = pivot.to(device).long().reshape(B)
    acc = torch.full((B, n), float("inf") if maxmin else 0.0, dtype=torch.float32, device=device)
    taken = torch.zeros(B, n, dtype=torch.bool, device=device)
    for step in range(k):
        picked[:, step] = cur
        taken[rows, cur] = True
        sim = similarity_to(cur).float()
        if maxmin:
            acc = torch.minimum(acc, 1.0 - sim)
            cur = torch.where(taken, float("-inf"), acc).argmax(dim=1)
        else:
            acc = acc + sim
            cur = torch.where(taken, float("inf"), acc).argmin(dim=1)
    return picked


def greedy_from_features(x: torch.Tensor, k: int, pivot: torch.Tensor, maxmin: bool) -> torch.Tensor:
    """One batched matrix-vector product per step (cheapest in FLOPs: k*n*D per image)."""
    B, n, _ = x.shape
    rows = torch.arange(B, device=x.device)
    return greedy(lambda cur: torch.bmm(x, x[rows, cur].unsqueeze(2)).squeeze(2), B, n, k, pivot, maxmin, x.device)


def greedy_from_gram(gram: torch.Tensor, k: int, pivot: torch.Tensor, maxmin: bool) -> torch.Tensor:
    """The same rules read off a precomputed similarity matrix (B, n, n): what the Triton kernel implements."""
    B, n, _ = gram.shape
    rows = torch.arange(B, device=gram.device)
    return greedy(lambda cur: gram[rows, cur], B, n, k, pivot, maxmin, gram.device)

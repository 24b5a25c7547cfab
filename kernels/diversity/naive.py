"""PyTorch definitions of greedy diversity selection (ToDRE stage 1), the references of the Triton kernel.

Rows of ``x`` are L2-normalised, so ``x @ x[c]`` are cosine similarities. Both rules start from a pivot and add one
token per step; they differ in what "far from the kept set" means:
* max-sum (ToDRE v2): the smallest *summed* similarity to the kept tokens;
* max-min (greedy k-center, ToDRE v1): the largest distance ``1 - cos`` to the *nearest* kept token.
"""

from __future__ import annotations

import torch


def maxsum_select(x: torch.Tensor, k: int, pivot: int | torch.Tensor) -> torch.Tensor:
    """k indices in pick order, one matrix-vector product per step (cheapest in FLOPs: k*n*D)."""
    n = x.shape[0]
    k = min(k, n)
    picked = torch.empty(k, dtype=torch.long, device=x.device)
    cur = torch.as_tensor(pivot, device=x.device).reshape(())
    total = torch.zeros(n, dtype=torch.float32, device=x.device)
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    for step in range(k):
        picked[step] = cur
        taken[cur] = True
        total += (x @ x[cur]).float()
        cur = torch.where(taken, float("inf"), total).argmin()
    return picked


def maxmin_select(x: torch.Tensor, k: int, pivot: int | torch.Tensor) -> torch.Tensor:
    """k indices in pick order for the greedy k-center rule."""
    n = x.shape[0]
    k = min(k, n)
    picked = torch.empty(k, dtype=torch.long, device=x.device)
    cur = torch.as_tensor(pivot, device=x.device).reshape(())
    nearest = torch.full((n,), float("inf"), dtype=torch.float32, device=x.device)
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    for step in range(k):
        picked[step] = cur
        taken[cur] = True
        nearest = torch.minimum(nearest, 1.0 - (x @ x[cur]).float())
        cur = torch.where(taken, float("-inf"), nearest).argmax()
    return picked


def greedy_from_gram(gram: torch.Tensor, k: int, pivot: torch.Tensor, maxmin: bool) -> torch.Tensor:
    """The same rules read off a precomputed similarity matrix ``gram`` (B, n, n): (B, k) indices, pick order.

    This is the exact definition the Triton kernel implements (one row of ``gram`` per step)."""
    B, n, _ = gram.shape
    k = min(k, n)
    rows = torch.arange(B, device=gram.device)
    picked = torch.empty(B, k, dtype=torch.long, device=gram.device)
    cur = pivot.to(gram.device).long()
    acc = torch.full((B, n), float("inf") if maxmin else 0.0, dtype=torch.float32, device=gram.device)
    taken = torch.zeros(B, n, dtype=torch.bool, device=gram.device)
    for step in range(k):
        picked[:, step] = cur
        taken[rows, cur] = True
        row = gram[rows, cur].float()
        if maxmin:
            acc = torch.minimum(acc, 1.0 - row)
            cur = torch.where(taken, float("-inf"), acc).argmax(dim=1)
        else:
            acc = acc + row
            cur = torch.where(taken, float("inf"), acc).argmin(dim=1)
    return picked

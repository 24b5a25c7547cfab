"""PyTorch references for the SVG2 kernels: the definitions the Triton kernels are tested against, and the
portable path on CPUs and on hardware without Triton.

Shapes: every tensor is batched over ``BH`` = batch x heads; tokens ``N``; head dim ``D``; ``K`` clusters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kmeans_assign_reference(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Nearest centroid (squared Euclidean) of every token: ``(BH, N, D), (BH, K, D) -> (BH, N)`` int64.

    ``||x||^2`` is the same for every centroid, so the argmin only needs ``||c||^2 - 2 x.c`` (fp32). Token chunks
    keep the ``(BH, chunk, K)`` distance block small.
    """
    c = centroids.float()
    c_sq = c.square().sum(-1).unsqueeze(1)  # (BH, 1, K)
    labels = torch.empty(x.shape[:2], dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[1], chunk):
        xs = x[:, start : start + chunk].float()
        labels[:, start : start + chunk] = (c_sq - 2.0 * xs @ c.transpose(1, 2)).argmin(-1)
    return labels


def flat_cluster_ids(labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """(BH, N) labels -> (BH * N,) ids of (head, cluster) pairs: one ``index_add_`` / ``bincount`` for all heads."""
    heads = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1)
    return (labels + num_clusters * heads).flatten()


def cluster_sizes(labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Tokens per cluster, (BH, K) int64. (``index_add_`` rather than ``bincount``, which syncs with the host.)"""
    flat = flat_cluster_ids(labels, num_clusters)
    sizes = torch.zeros(labels.shape[0] * num_clusters, dtype=torch.int64, device=labels.device)
    return sizes.index_add_(0, flat, torch.ones_like(flat)).view(-1, num_clusters)


def kmeans_update_reference(
    x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd update: each centroid becomes the fp32 mean of its tokens; an empty cluster keeps its old centroid.

    Returns ``(new_centroids (BH, K, D) fp32, sizes (BH, K) int64)``.
    """
    bh, k, d = centroids.shape
    flat = flat_cluster_ids(labels, k)
    sums = torch.zeros(bh * k, d, dtype=torch.float32, device=x.device).index_add_(0, flat, x.reshape(-1, d).float())
    sums = sums.view(bh, k, d)
    sizes = cluster_sizes(labels, k)
    means = sums / sizes.clamp(min=1).unsqueeze(-1)
    return torch.where(sizes.unsqueeze(-1) > 0, means, centroids.float()), sizes


def kmeans_step_reference(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One Lloyd step: ``(labels (BH, N) int64, new fp32 centroids (BH, K, D), sizes (BH, K) int64)``, the tokens'
    nearest centroids, the new centroids their means (empty clusters keep theirs) and the clusters' sizes."""
    labels = kmeans_assign_reference(x, centroids)
    return labels, *kmeans_update_reference(x, labels, centroids)


def varblock_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    range_start: torch.Tensor,
    range_end: torch.Tensor,
    num_ranges: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Variable-block sparse attention over the permuted layout, computing only the kept blocks.

    ``q`` (BH, Nq, D) holds query cluster ``i`` in rows ``q_offsets[:, i] : q_offsets[:, i + 1]``; the cluster attends
    to key/value rows ``range_start[:, i, r] : range_end[:, i, r]`` for ``r < num_ranges[:, i]`` of ``k``, ``v``
    (BH, Nk, D), softmax-normalised over those rows only. Rows of ``q`` outside every cluster come out as zeros.
    One SDPA per (head, query cluster) on the gathered keys: slow in Python, but the FLOPs are the sparse ones.
    """
    out = torch.zeros_like(q)
    offsets = q_offsets.tolist()
    for h in range(q.shape[0]):
        keys = ranges_to_mask(range_start[h], range_end[h], num_ranges[h], k.shape[1])
        for i in range(keys.shape[0]):
            q0, q1 = offsets[h][i], offsets[h][i + 1]
            idx = keys[i].nonzero().squeeze(1)
            if q1 > q0 and idx.numel():
                out[h, q0:q1] = F.scaled_dot_product_attention(
                    q[h, None, q0:q1], k[h, None, idx], v[h, None, idx], scale=scale
                )[0]
    return out


def ranges_to_mask(start: torch.Tensor, end: torch.Tensor, count: torch.Tensor, n: int) -> torch.Tensor:
    """(C, R) row ranges, the first ``count[c]`` valid -> (C, n) bool mask of the rows they cover."""
    valid = torch.arange(start.shape[-1], device=start.device) < count.unsqueeze(-1)
    step = valid.int()
    delta = torch.zeros(start.shape[0], n + 1, dtype=torch.int32, device=start.device)
    delta.scatter_add_(1, torch.where(valid, start.long(), n), step)
    delta.scatter_add_(1, torch.where(valid, end.long(), n), -step)
    return delta.cumsum(1)[:, :n] > 0


def masked_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """Dense attention with an element mask ``allowed`` (BH, Nq, Nk): the definition sparse attention must equal.

    Computed in fp32; a query row with no allowed key gets zeros.
    """
    scores = (q.float() @ k.float().transpose(1, 2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ v.float()).to(q.dtype)

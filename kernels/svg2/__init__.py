"""SVG2 kernels, one dispatch point: Triton for CUDA tensors, the PyTorch references (``naive``) otherwise
(``backend`` as in :mod:`vtoken.kernels.dispatch`)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from vtoken.kernels.dispatch import BACKENDS, triton_available, use_triton
from vtoken.kernels.svg2 import naive


class LabelGroups(NamedTuple):
    """Tokens grouped by cluster: ``order`` (BH, N) sorts tokens by label (stable), ``sizes`` (BH, K) and
    ``offsets`` (BH, K + 1) locate cluster c at ``order[:, offsets[:, c] : offsets[:, c + 1]]``."""

    order: torch.Tensor
    sizes: torch.Tensor
    offsets: torch.Tensor


def group_by_label(labels: torch.Tensor, num_clusters: int, sizes: torch.Tensor | None = None) -> LabelGroups:
    """The grouping of ``labels`` (BH, N); ``sizes`` (BH, K): the clusters' sizes when already counted."""
    order = torch.sort(labels, dim=-1, stable=True).indices
    sizes = naive.cluster_sizes(labels, num_clusters) if sizes is None else sizes
    offsets = torch.nn.functional.pad(sizes.cumsum(-1), (1, 0))
    return LabelGroups(order, sizes, offsets)


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Nearest centroid of each token: ``(BH, N, D), (BH, K, D) -> (BH, N)`` int64."""
    if use_triton(x, backend):
        from vtoken.kernels.svg2.kmeans import kmeans_assign_triton

        return kmeans_assign_triton(x, centroids)
    return naive.kmeans_assign_reference(x, centroids)


def kmeans_step(x: torch.Tensor, centroids: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, ...]:
    """One Lloyd step: ``(labels (BH, N), new fp32 centroids (BH, K, D), sizes (BH, K))`` (means of the new labels;
    empty clusters keep their centroid). On Triton one kernel computes distances, argmin and the centroid sums, and
    a second one the means."""
    if use_triton(x, backend):
        from vtoken.kernels.svg2.kmeans import kmeans_step_triton

        return kmeans_step_triton(x, centroids)
    return naive.kmeans_step_reference(x, centroids)


def varblock_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    range_start: torch.Tensor,
    range_end: torch.Tensor,
    num_ranges: torch.Tensor,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Variable-block sparse attention over the permuted layout (see ``naive.varblock_attention_reference``)."""
    args = (q, k, v, q_offsets, range_start, range_end, num_ranges, scale)
    if use_triton(q, backend):
        from vtoken.kernels.svg2.sparse_attention import varblock_attention_triton

        return varblock_attention_triton(*args)
    return naive.varblock_attention_reference(*args)


__all__ = [
    "BACKENDS", "LabelGroups", "group_by_label", "kmeans_assign", "kmeans_step", "triton_available",
    "use_triton", "varblock_attention",
]

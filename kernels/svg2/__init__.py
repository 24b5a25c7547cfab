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


def group_by_label(labels: torch.Tensor, num_clusters: int) -> LabelGroups:
    order = torch.sort(labels, dim=-1, stable=True).indices
    sizes = naive.cluster_sizes(labels, num_clusters)
    offsets = torch.nn.functional.pad(sizes.cumsum(-1), (1, 0))
    return LabelGroups(order, sizes, offsets)


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Nearest centroid of each token: ``(BH, N, D), (BH, K, D) -> (BH, N)`` int64."""
    if use_triton(x, backend):
        from vtoken.kernels.svg2.kmeans import kmeans_assign_triton

        return kmeans_assign_triton(x, centroids)
    return naive.kmeans_assign_reference(x, centroids)


def kmeans_update(
    x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, LabelGroups]:
    """Lloyd update (fp32 means, empty clusters keep their centroid) and the label grouping it used."""
    groups = group_by_label(labels, centroids.shape[1])
    if use_triton(x, backend):
        from vtoken.kernels.svg2.kmeans import kmeans_update_triton

        return kmeans_update_triton(x, groups.order, groups.offsets, centroids), groups
    return naive.kmeans_update_reference(x, labels, centroids)[0], groups


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
    "BACKENDS", "LabelGroups", "group_by_label", "kmeans_assign", "kmeans_update", "triton_available",
    "use_triton", "varblock_attention",
]

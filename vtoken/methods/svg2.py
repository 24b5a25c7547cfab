"""SVG2, Sparse VideoGen2 (Yang, Xi et al., arXiv 2505.18875): semantic-aware permutation sparse attention.

Per layer, per head, per denoising step of a video DiT's self-attention:

1. k-means on the queries and, separately, on the keys (``q_clusters`` / ``k_clusters`` centroids). The first call
   of a layer starts from seeded distinct tokens and runs ``kmeans_init_iters`` Lloyd iterations; later steps start
   from that layer's previous centroids (the centroid cache) and run ``kmeans_step_iters``.
2. Attention mass between query cluster i and key cluster j, estimated from centroids only: a softmax over the key
   centroids weighted by key-cluster sizes (``cluster_mass``).
3. Per query cluster, the smallest set of key clusters whose estimated mass reaches ``top_p``, and at least
   ``floor(min_key_cluster_ratio * k_clusters)`` of them (``select_key_clusters``).
4. Permute queries and keys so that every cluster is a contiguous run of rows, run variable-block sparse attention
   over the kept (query cluster, key run) blocks, and undo the query permutation (``sparse_attention``).

This module is pure tensor code; ``vtoken.adapters.bridges.dit_svg2`` decides when it runs and keeps the centroid
caches.
Deviations from the official code, all deliberate: k-means runs a fixed number of iterations (no host sync for a
tolerance test); the initial centroids are distinct tokens (sampling with replacement duplicates centroids); scores,
masses, cumulative sums and centroids are fp32; ``top_p = 1`` keeps every key cluster, so it is exactly dense.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtoken.checks import check_choice, check_float, check_int
from vtoken.kernels.svg2 import BACKENDS, LabelGroups, group_by_label, kmeans_step, varblock_attention
from vtoken.kernels.svg2.flashinfer_backend import available as flashinfer_available
from vtoken.kernels.svg2.flashinfer_backend import block_layout, flashinfer_attention
from vtoken.registry import register_method
from vtoken.timing import Stopwatch

# Cluster counts (query, key) per host when the user sets none: the official scripts' per-model counts; any other
# caller of ``svg2_attention`` gets the paper's generic 100 / 500 (Table 1).
MODEL_CLUSTERS = {"wan": (300, 1000), "hunyuan_video": (400, 1000)}
# "flashinfer": FlashInfer's variable-block sparse attention (the release's); k-means then runs as under "auto"
SVG2_BACKENDS = (*BACKENDS, "flashinfer")
GENERIC_CLUSTERS = (100, 500)


@register_method("svg2", stages=("attention",))
@dataclass
class SVG2Config:
    """Sparse VideoGen2: k-means-clustered, top-p budgeted, variable-block sparse self-attention for video DiTs.

    Defaults: cluster counts per model as the official scripts set them (``q_clusters`` / ``k_clusters`` None: 300 /
    1000 on Wan, 400 / 1000 on HunyuanVideo, the paper's generic 100 / 500 elsewhere; ``for_model``), and the
    official scripts' top_p 0.9, 10 % minimum key-cluster budget, 50 / 2 k-means iterations, 10 dense warm-up steps
    (20 % of 50) and 1 dense layer.
    """

    top_p: float = 0.9
    q_clusters: int | None = None
    k_clusters: int | None = None
    min_key_cluster_ratio: float = 0.1
    dense_steps: int = 10
    dense_layers: int = 1
    kmeans_init_iters: int = 50
    kmeans_step_iters: int = 2
    kmeans_in_dense_steps: bool = False
    seed: int = 0
    backend: str = "auto"
    record_stats: bool = True

    def __post_init__(self):
        self.top_p = check_float(self.top_p, "top_p", 0.0, 1.0, low_open=True)
        for name in ("q_clusters", "k_clusters"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, 1)
        self.min_key_cluster_ratio = check_float(self.min_key_cluster_ratio, "min_key_cluster_ratio", 0.0, 1.0)
        check_int(self.dense_steps, "dense_steps", 0)
        check_int(self.dense_layers, "dense_layers", 0)
        check_int(self.kmeans_init_iters, "kmeans_init_iters", 1)
        check_int(self.kmeans_step_iters, "kmeans_step_iters", 1)
        check_choice(self.kmeans_in_dense_steps, "kmeans_in_dense_steps", (True, False))
        check_int(self.seed, "seed", 0)
        check_choice(self.backend, "backend", SVG2_BACKENDS)
        if self.backend == "flashinfer" and not flashinfer_available():
            raise ValueError("backend='flashinfer' needs the flashinfer-python package, which does not import here; "
                             f"choose one of {', '.join(map(repr, BACKENDS))}")
        check_choice(self.record_stats, "record_stats", (True, False))

    def for_model(self, host: str | None) -> SVG2Config:
        """This config with the cluster counts left unset filled in for ``host`` (``MODEL_CLUSTERS``, else the
        paper's generic counts); counts the user set stay."""
        q, k = MODEL_CLUSTERS.get(host, GENERIC_CLUSTERS)
        return dataclasses.replace(self, q_clusters=q if self.q_clusters is None else self.q_clusters,
                                   k_clusters=k if self.k_clusters is None else self.k_clusters)

    @property
    def min_key_clusters(self) -> int:
        return int(self.min_key_cluster_ratio * self.for_model(None).k_clusters)


# -- k-means ------------------------------------------------------------------------------------------------------


@dataclass
class Clusters:
    """k-means result for one tensor of ``BH`` heads: labels (BH, N), fp32 centroids (BH, K, D), and the tokens grouped
    by label (``groups.order`` is the permutation that makes clusters contiguous; ``groups.sizes``, ``.offsets``)."""

    labels: torch.Tensor
    centroids: torch.Tensor
    groups: LabelGroups


def check_cluster_count(k: int, n: int, arg: str) -> None:
    if k > n:
        raise ValueError(f"{arg}={k} is larger than the {n} tokens of this attention call; use {arg} <= {n}")


def init_centroids(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` distinct tokens as fp32 centroids (BH, k, D), drawn with ``generator``.

    The same token positions serve every head and batch item, so a sample's clustering does not depend on what else
    is in the batch (batch = singles).
    """
    picks = torch.rand(x.shape[1], generator=generator, device=x.device).topk(k).indices
    return x[:, picks].float()


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> Clusters:
    """Batched Lloyd k-means on ``x`` (BH, N, D), Euclidean, ``iters`` >= 1 fixed iterations.

    Starts from ``init`` (BH, k, D) when given (warm start), else from ``init_centroids``. The returned labels are
    those of the last assignment and the centroids their means (empty clusters keep their previous centroid).
    """
    check_cluster_count(k, x.shape[1], "k")
    centroids = init.float() if init is not None else init_centroids(x, k, generator)
    for _ in range(iters):
        labels, centroids, sizes = kmeans_step(x, centroids, backend)
    return Clusters(labels, centroids, group_by_label(labels, k, sizes))


# -- cluster plan -------------------------------------------------------------------------------------------------


def cluster_mass(q_centroids: torch.Tensor, k_centroids: torch.Tensor, k_sizes: torch.Tensor, scale: float):
    """Estimated attention mass P'[i, j] that a query of cluster i puts on the tokens of key cluster j, (BH, Cq, Ck).

    A softmax of ``scale * cq_i . ck_j`` over key centroids, each weighted by its cluster size (``+ log size`` in
    the logits; empty clusters get zero mass). Rows sum to one. fp32 throughout.
    """
    logits = (q_centroids.float() @ k_centroids.float().transpose(1, 2)) * scale
    logits = logits + k_sizes.float().log().unsqueeze(1)  # log 0 = -inf: empty clusters drop out
    return torch.softmax(logits, dim=-1)


def select_key_clusters(mass: torch.Tensor, top_p: float, min_keep: int = 0) -> torch.Tensor:
    """Kept (query cluster, key cluster) blocks, bool (BH, Cq, Ck).

    Per row: key clusters by decreasing mass, up to and including the one whose cumulative mass crosses ``top_p``
    (rank r is kept iff the mass of ranks < r is <= top_p), and at least ``min_keep`` of them. ``top_p >= 1`` keeps
    all (a cumulative sum in floating point may reach 1 early and drop a tiny-mass cluster).
    """
    ck = mass.shape[-1]
    if top_p >= 1.0:
        return torch.ones_like(mass, dtype=torch.bool)
    sorted_mass, order = mass.sort(dim=-1, descending=True)
    before = sorted_mass.cumsum(-1) - sorted_mass  # mass of the higher-ranked clusters
    count = (before <= top_p).sum(-1, keepdim=True).clamp(min=max(1, min(min_keep, ck)))
    ranks_kept = torch.arange(ck, device=mass.device) < count
    return torch.zeros_like(ranks_kept).scatter_(-1, order, ranks_kept)


def compact(flags: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move ``values`` where ``flags`` to the front of the last dim, in order: (packed, count). No host sync."""
    width = flags.shape[-1]
    slot = torch.where(flags, flags.long().cumsum(-1) - 1, width)  # unflagged values all go to a dropped slot
    packed = torch.zeros(*flags.shape[:-1], width + 1, dtype=values.dtype, device=values.device)
    packed.scatter_(-1, slot, values)
    return packed[..., :width], flags.sum(-1)


def key_ranges(keep: torch.Tensor, k_offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key-row ranges of the permuted keys that each query cluster attends: ``(start, end, count)``.

    Kept key clusters with consecutive ids are adjacent after the permutation, so runs of them merge into one range
    (empty clusters do not break a run: they have no rows). Returns start/end (BH, Cq, Ck) int32 padded after
    ``count`` (BH, Cq).
    """
    empty = (k_offsets[:, 1:] == k_offsets[:, :-1]).unsqueeze(1)
    run = keep | empty
    run_start = run & ~F.pad(run[..., :-1], (1, 0), value=False)
    run_end = run & ~F.pad(run[..., 1:], (0, 1), value=False)
    ids = torch.arange(keep.shape[-1], device=keep.device).expand_as(keep)
    first, count = compact(run_start, ids)
    last, _ = compact(run_end, ids)
    offsets = k_offsets.unsqueeze(1).expand(-1, keep.shape[1], -1)
    start = offsets.gather(-1, first)
    end = offsets.gather(-1, last + 1)
    return start.int(), end.int(), count.int()


def append_range(start, end, count, first: torch.Tensor, stop: torch.Tensor):
    """Add key rows ``first : stop`` (BH,) as one more range of every query cluster of ``key_ranges``' output."""
    shape = (*start.shape[:-1], 1)
    slot = count.long().unsqueeze(-1)
    first, stop = (t.view(-1, 1, 1).expand(shape).to(start) for t in (first, stop))
    start = torch.cat([start, start.new_zeros(shape)], -1).scatter(-1, slot, first)
    end = torch.cat([end, end.new_zeros(shape)], -1).scatter(-1, slot, stop)
    return start, end, count + 1


@dataclass
class SparsePlan:
    """Everything the sparse attention of one call needs (all on the device, no host sync to build).

    ``q_order`` / ``k_order`` (BH, N) permute tokens so clusters are contiguous; query cluster i owns rows
    ``q_offsets[:, i] : q_offsets[:, i + 1]`` and attends key rows ``range_start[:, i, r] : range_end[:, i, r]``,
    ``r < num_ranges[:, i]``. ``keep`` (BH, Cq, Ck) is the block mask over clusters of ``k_sizes`` (BH, Ck) keys;
    ``extra_keys`` (BH,) the always-attended rows after the clustered keys (None: none); ``pairs`` (BH,) the
    query-key pairs computed.
    """

    q_order: torch.Tensor
    q_offsets: torch.Tensor
    k_order: torch.Tensor
    keep: torch.Tensor
    range_start: torch.Tensor
    range_end: torch.Tensor
    num_ranges: torch.Tensor
    pairs: torch.Tensor
    num_keys: torch.Tensor
    k_sizes: torch.Tensor
    extra_keys: torch.Tensor | None = None

    @property
    def density(self) -> torch.Tensor:
        """Fraction of the query-key pairs of dense attention that are computed, per head (BH,)."""
        return self.pairs / (self.q_order.shape[1] * self.num_keys)


def make_plan(
    qc: Clusters,
    kc: Clusters,
    scale: float,
    top_p: float,
    min_keep: int = 0,
    extra_keys: torch.Tensor | None = None,
) -> SparsePlan:
    """Block plan from the query and key clusterings.

    ``extra_keys`` (BH,) int: that many rows stored after the clustered keys are attended by every query cluster
    (HunyuanVideo's valid text tokens); they take no part in the mass estimate or the top-p selection.
    """
    keep = select_key_clusters(cluster_mass(qc.centroids, kc.centroids, kc.groups.sizes, scale), top_p, min_keep)
    start, end, count = key_ranges(keep, kc.groups.offsets)
    n_video = kc.labels.shape[1]
    kept_keys = (keep.long() * kc.groups.sizes.unsqueeze(1)).sum(-1)  # (BH, Cq)
    num_keys = torch.full_like(kept_keys[:, 0], n_video)
    if extra_keys is not None:
        extra_keys = extra_keys.to(num_keys)
        start, end, count = append_range(start, end, count, num_keys, num_keys + extra_keys)
        kept_keys = kept_keys + extra_keys.unsqueeze(1)
        num_keys = num_keys + extra_keys
    pairs = (kept_keys * qc.groups.sizes).sum(-1)
    return SparsePlan(qc.groups.order, qc.groups.offsets, kc.groups.order, keep, start, end, count, pairs, num_keys,
                      kc.groups.sizes, extra_keys)


# -- permutation and attention ----------------------------------------------------------------------------------


def flashinfer_layout(plan: SparsePlan, extra_rows: int = 0):
    """``plan`` in FlashInfer's block terms (``kernels/svg2/flashinfer_backend.block_layout``), with ``extra_rows``
    rows stored after the clustered keys."""
    return block_layout(plan.q_offsets.diff(dim=-1), plan.k_sizes, plan.keep, plan.extra_keys, extra_rows)


def permute_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (BH, N, D) in the order ``order`` (BH, N): ``out[:, r] = x[:, order[:, r]]``."""
    return x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def unpermute_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of ``permute_tokens``: ``out[:, order[:, r]] = x[:, r]``."""
    return torch.empty_like(x).scatter_(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: SparsePlan,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """SVG2 attention of ``q`` (BH, Nq, D) over ``k``, ``v`` (BH, Nk, D) under ``plan``, in the original token order.

    The first ``plan.k_order.shape[1]`` keys are the clustered ones; any rows after them are the plan's extra keys
    (stored valid-first) and are not permuted.
    """
    n_video = plan.k_order.shape[1]
    k_perm = permute_tokens(k[:, :n_video], plan.k_order)
    v_perm = permute_tokens(v[:, :n_video], plan.k_order)
    if k.shape[1] > n_video:
        k_perm = torch.cat([k_perm, k[:, n_video:]], 1)
        v_perm = torch.cat([v_perm, v[:, n_video:]], 1)
    q_perm = permute_tokens(q, plan.q_order)
    if backend == "flashinfer":
        out = flashinfer_attention(q_perm, k_perm, v_perm, *flashinfer_layout(plan, k.shape[1] - n_video), scale)
    else:
        out = varblock_attention(q_perm, k_perm, v_perm, plan.q_offsets, plan.range_start, plan.range_end,
                                 plan.num_ranges, scale, backend)
    return unpermute_tokens(out, plan.q_order)


def allowed_pairs(plan: SparsePlan, q_labels: torch.Tensor, k_labels: torch.Tensor) -> torch.Tensor:
    """Element mask (BH, Nq, Nk_video) in the original token order: query t may see key u iff ``keep[lq(t), lk(u)]``.

    The dense definition of what ``sparse_attention`` computes (used by tests and the quality benchmark).
    """
    rows = plan.keep.gather(1, q_labels.unsqueeze(-1).expand(-1, -1, plan.keep.shape[-1]))
    return rows.gather(2, k_labels.unsqueeze(1).expand(-1, q_labels.shape[1], -1))


# -- one call ---------------------------------------------------------------------------------------------------


def step_clusters(x: torch.Tensor, k: int, config: SVG2Config, init: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> Clusters:
    """One denoising step's k-means of ``x``: warm from the previous step's centroids ``init``
    (``kmeans_step_iters``), or seeded from ``generator`` (``kmeans_init_iters``) when there are none."""
    iters = config.kmeans_step_iters if init is not None else config.kmeans_init_iters
    return kmeans(x, k, iters, init, generator, "auto" if config.backend == "flashinfer" else config.backend)


@dataclass
class SVG2Output:
    out: torch.Tensor
    q_clusters: Clusters
    k_clusters: Clusters
    plan: SparsePlan


def svg2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SVG2Config,
    q_init: torch.Tensor | None = None,
    k_init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    extra_keys: torch.Tensor | None = None,
    stopwatch: Stopwatch | None = None,
) -> SVG2Output:
    """One SVG2 attention call on ``q`` (BH, N, D) and ``k``, ``v`` (BH, N [+ extra], D): cluster, plan, attend.

    ``q_init`` / ``k_init``: the previous step's centroids of this layer (warm start, ``kmeans_step_iters``), or None
    (seeded start from ``generator``, ``kmeans_init_iters``). ``extra_keys`` as in ``make_plan``. ``stopwatch`` gets
    the marks "kmeans", "plan", "attention".
    """
    n = q.shape[1]
    config = config.for_model(None)  # counts left unset: the paper's generic ones
    check_cluster_count(config.q_clusters, n, "q_clusters")
    check_cluster_count(config.k_clusters, n, "k_clusters")
    scale = 1.0 / math.sqrt(q.shape[-1])
    watch = stopwatch or Stopwatch(q.device, enabled=False)
    with torch.no_grad():
        qc = step_clusters(q, config.q_clusters, config, q_init, generator)
        kc = step_clusters(k[:, :n], config.k_clusters, config, k_init, generator)
        watch.mark("kmeans")
        plan = make_plan(qc, kc, scale, config.top_p, config.min_key_clusters, extra_keys)
        watch.mark("plan")
        out = sparse_attention(q, k, v, plan, scale, config.backend)
        watch.mark("attention")
    return SVG2Output(out, qc, kc, plan)

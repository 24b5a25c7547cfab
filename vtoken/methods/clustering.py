"""Token clustering + token reconstruction layers for ViTs (Liang et al., "Expediting Large-Scale Vision
Transformer for Dense Prediction without Fine-tuning", NeurIPS 2022; docs/token_clustering.md).

After ``cluster_after`` blocks the H x W patch tokens are replaced by an h x w grid of cluster centres (local soft
k-means seeded by adaptive average pooling); the following blocks run on 1 + M tokens instead of 1 + N. A fixed
top-k affinity between the pre-clustering tokens and the centres maps any later clustered feature back to H x W.
Both layers are parameter-free, so a pretrained ViT is used as it is.

Shapes: B batch, N = H*W patch tokens (prefix tokens such as [CLS] removed, raster order), M = h*w clusters,
C channels. Distances are computed in fp32 whatever the input dtype (ViT-L activations overflow fp16 squared).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vtoken.checks import check_choice, check_float, check_int
from vtoken.registry import register_method

Grid = tuple[int, int]
ClusterSpec = int | float | tuple[int, int]



# -- geometry ----------------------------------------------------------------------------------------------------
def cluster_grid(num_clusters: ClusterSpec, grid: Grid, arg: str = "num_clusters") -> Grid:
    """The h x w cluster grid for an H x W patch grid.

    An int must be a perfect square (h = w, as in every released implementation); a float in (0, 1] is the
    fraction of patches kept, spread over both axes so the grid keeps the input's aspect ratio; a pair is (h, w).
    """
    H, W = grid
    if isinstance(num_clusters, float):
        side = math.sqrt(num_clusters)
        h, w = max(1, int(H * side + 0.5)), max(1, int(W * side + 0.5))
    elif isinstance(num_clusters, int):
        h = w = math.isqrt(num_clusters)
    else:
        h, w = num_clusters
    if h > H or w > W:
        raise ValueError(
            f"{arg}={num_clusters!r} asks for a {h}x{w} cluster grid, larger than this input's {H}x{W} patch grid; "
            f"use at most {H * W if H == W else (H, W)} clusters"
        )
    return h, w


def initial_labels(grid: Grid, clusters: Grid, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid cell (row, col) of each token's initial cluster, (N,) each: nearest upsampling of the h x w grid."""
    (H, W), (h, w) = grid, clusters
    rows = torch.div(torch.arange(H, device=device) * h, H, rounding_mode="floor")
    cols = torch.div(torch.arange(W, device=device) * w, W, rounding_mode="floor")
    return rows.repeat_interleave(W), cols.repeat(H)


def local_mask(grid: Grid, clusters: Grid, window: int, device=None) -> torch.Tensor:
    """(M, N) bool: centre j may take token p iff j lies in the window x window box of cells around p's initial cell.

    Every token's own cell is in its box, so each column has at least one admissible centre.
    """
    h, w = clusters
    token_row, token_col = initial_labels(grid, clusters, device)
    centre_row = torch.arange(h, device=device).repeat_interleave(w)
    centre_col = torch.arange(w, device=device).repeat(h)
    r = window // 2
    near_row = (centre_row[:, None] - token_row[None, :]).abs() <= r
    near_col = (centre_col[:, None] - token_col[None, :]).abs() <= r
    return near_row & near_col


def admissible_pairs(grid: Grid, clusters: Grid, window: int) -> int:
    """The number of True entries of ``local_mask(grid, clusters, window)``, from the geometry alone (no device read):
    a token's box holds (centre rows within reach of its row) x (centre columns within reach of its column)."""
    (H, W), (h, w), r = grid, clusters, window // 2

    def reach(n: int, cells: int) -> int:
        return sum(min(cells - 1, i * cells // n + r) - max(0, i * cells // n - r) + 1 for i in range(n))

    return reach(H, h) * reach(W, w)


def squared_distances(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor | None = None) -> torch.Tensor:
    """(B, P, Q) fp32 squared Euclidean distances between rows of ``a`` (B, P, C) and ``b`` (B, Q, C), >= 0.

    ``b_sq`` optionally holds the precomputed squared norms of ``b`` (B, Q), reused across k-means rounds.
    """
    a, b = a.float(), b.float()
    b_sq = b.square().sum(-1) if b_sq is None else b_sq
    with fp32_matmuls(a):
        d = torch.baddbmm(b_sq[:, None, :], a, b.transpose(1, 2), alpha=-2)
    return d.add_(a.square().sum(-1)[:, :, None]).clamp_min_(0)


def fp32_matmuls(like: torch.Tensor):
    """Keep an enclosing ``torch.autocast`` from running these matmuls in bf16/fp16: |a|^2 + |b|^2 - 2ab cancels."""
    return torch.autocast(like.device.type, enabled=False)


# -- clustering ------------------------------------------------------------------------------------------------------
@dataclass
class Clustering:
    """Output of :class:`TokenClustering`. ``centers`` (B, M, C) in the input dtype, raster order of ``grid``;
    ``centers_fp32`` are the same centres before the cast (the reconstruction affinity uses them);
    ``temperature`` (B,) the inverse temperature each image was clustered with."""

    centers: torch.Tensor
    centers_fp32: torch.Tensor
    temperature: torch.Tensor
    grid: Grid


class TokenClustering(nn.Module):
    """Local soft k-means of patch tokens into an h x w grid of centres (no parameters).

    Centres start as the adaptive average pool of the token grid; each of ``iterations`` rounds softly assigns every
    token to the centres in a ``window`` x ``window`` box around its initial cell (softmax over centres of
    ``-t * squared distance``) and moves each centre to the weighted mean of its tokens. ``iterations=0`` is plain
    adaptive average pooling. ``temperature`` is t, a multiplier on squared distances as in the official code
    ("temperture"); None calibrates it per image as ``relative_temperature / median(D)``, D the squared
    distances of the admissible (token, initial centre) pairs, which makes it independent of the feature scale.
    """

    def __init__(
        self,
        num_clusters: ClusterSpec,
        iterations: int = 5,
        temperature: float | None = None,
        relative_temperature: float = 10.0,
        window: int = 5,
    ):
        super().__init__()
        self.num_clusters = num_clusters
        self.iterations = iterations
        self.temperature = temperature
        self.relative_temperature = relative_temperature
        self.window = window

    def forward(self, tokens: torch.Tensor, grid: Grid) -> Clustering:
        """``tokens`` (B, N, C) patch tokens in raster order of ``grid`` = (H, W)."""
        B, N, C = tokens.shape
        if N != grid[0] * grid[1]:
            raise ValueError(f"tokens hold {N} patches but the patch grid is {grid[0]}x{grid[1]}")
        clusters = cluster_grid(self.num_clusters, grid)
        z = tokens.float()
        centers = F.adaptive_avg_pool2d(z.transpose(1, 2).reshape(B, C, *grid), clusters).flatten(2).transpose(1, 2)
        mask = local_mask(grid, clusters, self.window, tokens.device)
        z_sq = z.square().sum(-1)
        dist = squared_distances(centers, z, z_sq)  # (B, M, N)
        temperature = self._temperature(dist, mask, admissible_pairs(grid, clusters, self.window))
        outside = torch.zeros(mask.shape, device=tokens.device).masked_fill_(~mask, float("-inf"))
        for step in range(self.iterations):
            if step:
                dist = squared_distances(centers, z, z_sq)
            # Soft assignment over centres; detached like the official code (only matters when training).
            assign = torch.softmax(-temperature[:, None, None] * dist + outside, dim=1).detach()
            with fp32_matmuls(z):
                centers = torch.bmm(assign, z) / assign.sum(-1, keepdim=True).clamp_min(1e-16)
        return Clustering(centers.to(tokens.dtype), centers, temperature, clusters)

    def _temperature(self, dist: torch.Tensor, mask: torch.Tensor, admissible: int) -> torch.Tensor:
        if self.temperature is not None:
            return torch.full((dist.shape[0],), float(self.temperature), device=dist.device)
        # The median of the admissible pairs (torch.median's lower middle of an even count), without selecting them:
        # the others sort last as +inf, and the count comes from the geometry, so no size is read from the device.
        ranked = dist.masked_fill(~mask, float("inf")).flatten(1)
        median = ranked.kthvalue((admissible + 1) // 2, dim=1).values  # (B,)
        # Identical tokens (median 0), or a huge relative_temperature, would give an infinite t and -t * 0 = NaN;
        # any large finite value is as good.
        return (self.relative_temperature / median.clamp_min(1e-20)).clamp_max(torch.finfo(torch.float32).max)


# -- reconstruction --------------------------------------------------------------------------------------------------
class TokenReconstruction(nn.Module):
    """Maps clustered features (B, M, C') back to the N patch positions with a fixed sparse affinity (no parameters).

    ``affinity`` is computed once, right after clustering, from the pre-clustering tokens and the centres:
    W[p, j] = exp(-t * |z_p - s_j|^2) kept for the ``k`` nearest centres of each token (all M if M < k), then each
    row normalised. ``norm="sum"`` (default) makes every output a convex combination of centres; ``norm="l2"`` is
    the official code's ``F.normalize``, whose weights sum to 1 ... sqrt(k), so rows that are not peaked come out
    scaled up (harmless before a LayerNorm or an argmax, harmful anywhere else; see docs/token_clustering.md).
    There is no skip connection from the pre-clustering tokens (the official ViT code has none).
    """

    def __init__(self, k: int = 20, temperature: float | None = None, norm: str = "sum"):
        super().__init__()
        self.k = k
        self.temperature = temperature
        self.norm = norm

    def affinity(self, tokens: torch.Tensor, clustering: Clustering) -> torch.Tensor:
        """(B, N, M) fp32 reconstruction weights, zero outside each row's k nearest centres."""
        dist = squared_distances(tokens, clustering.centers_fp32)  # (B, N, M)
        k = min(self.k, dist.shape[-1])
        nearest, index = dist.topk(k, dim=-1, largest=False)  # ascending
        t = clustering.temperature if self.temperature is None else torch.full_like(clustering.temperature,
                                                                                   float(self.temperature))
        # Shifting by the row minimum leaves the normalised weights unchanged but cannot underflow to all-zero.
        weight = torch.exp(-t[:, None, None] * (nearest - nearest[..., :1]))
        scale = weight.norm(dim=-1, keepdim=True) if self.norm == "l2" else weight.sum(-1, keepdim=True)
        return torch.zeros_like(dist).scatter_(-1, index, weight / scale)

    def forward(self, features: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
        """``features`` (B, M, C') aligned with the centres -> (B, N, C') in the patch grid's raster order."""
        return torch.bmm(affinity.to(features.dtype), features)


# -- config ------------------------------------------------------------------------------------------------------
MIN_DEPTH = 2  # blocks a placement needs: one at full resolution before clustering, one on the clusters


def check_positive_finite(value, arg: str) -> float:
    return check_float(value, arg, 0.0, math.inf, low_open=True, high_open=True)


def check_cluster_spec(value) -> ClusterSpec:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
            raise ValueError(f"num_clusters={value!r}: a grid must be a pair of ints >= 1, (rows, cols)")
        return tuple(value)
    if isinstance(value, float):
        return check_float(value, "num_clusters", 0.0, 1.0, low_open=True)
    check_int(value, "num_clusters", 1)
    if math.isqrt(value) ** 2 != value:
        lo = math.isqrt(value)
        raise ValueError(
            f"num_clusters={value} is not a perfect square; an int gives a square grid (e.g. {lo * lo} or "
            f"{(lo + 1) ** 2}); pass (rows, cols) for another grid or a float for a fraction of the patches"
        )
    return value


@register_method("token_clustering", stages=("vision_blocks",))
@dataclass
class TokenClusteringConfig:
    """Token clustering inside a ViT (Expedit): blocks after cluster_after run on M cluster tokens.

    * ``cluster_after`` (alpha): blocks run at full resolution before clustering, 1 <= alpha < depth;
      None = half the depth.
    * ``num_clusters``: M as a perfect-square int (h = w), a (rows, cols) pair, or a float in (0, 1] = fraction of
      the patches (aspect ratio kept; 0.25 of 24x24 is 12x12).
    * ``reconstruct``: map the clustered tokens back to the full patch grid after block ``reconstruct_after``
      (an absolute block count, > cluster_after; negative values count from the end like Hugging Face
      ``hidden_states`` indices, so -1 = after the last block and -2 pairs with LLaVA's ``vision_feature_layer=-2``;
      None = -1). With ``reconstruct=False`` every later block, and the model's output, has 1 + M tokens.
    * ``iterations``, ``window``, ``temperature`` (t_c, multiplies squared distances; None = per image
      ``relative_temperature / median distance``): the local soft k-means.
    * ``k``, ``recon_temperature`` (t_r; None = the clustering temperature), ``recon_norm`` ("sum": convex
      weights, or "l2" as in the official code): the reconstruction affinity.
    """

    cluster_after: int | None = None
    num_clusters: ClusterSpec = 0.25
    reconstruct: bool = True
    reconstruct_after: int | None = None
    iterations: int = 5
    window: int = 5
    temperature: float | None = None
    relative_temperature: float = 10.0
    k: int = 20
    recon_temperature: float | None = None
    recon_norm: str = "sum"

    def __post_init__(self):
        if self.cluster_after is not None:
            check_int(self.cluster_after, "cluster_after", 1)
        self.num_clusters = check_cluster_spec(self.num_clusters)
        check_choice(self.reconstruct, "reconstruct", (True, False))
        if self.reconstruct_after is not None:
            check_int(self.reconstruct_after, "reconstruct_after")
            if not self.reconstruct:
                raise ValueError("reconstruct_after is only used with reconstruct=True; leave it None")
            if self.reconstruct_after == 0:
                raise ValueError("reconstruct_after=0 is out of range: it counts blocks run before reconstruction")
            if self.cluster_after is not None and 0 < self.reconstruct_after <= self.cluster_after:
                raise ValueError(
                    f"reconstruct_after={self.reconstruct_after} must be larger than cluster_after="
                    f"{self.cluster_after}: reconstruction maps clustered tokens back, so it comes after clustering"
                )
        check_int(self.iterations, "iterations", 0, 100)
        check_int(self.window, "window", 1)
        if self.window % 2 == 0:
            raise ValueError(f"window={self.window} must be odd (a box centred on the token's own cell)")
        # Temperatures are finite: t = inf makes -t * 0 (a token on its centre) NaN.
        if self.temperature is not None:
            self.temperature = check_positive_finite(self.temperature, "temperature")
        self.relative_temperature = check_positive_finite(self.relative_temperature, "relative_temperature")
        check_int(self.k, "k", 1)
        if self.recon_temperature is not None:
            self.recon_temperature = check_positive_finite(self.recon_temperature, "recon_temperature")
        check_choice(self.recon_norm, "recon_norm", ("l2", "sum"))

    def placement(self, depth: int) -> tuple[int, int | None]:
        """(alpha, beta) as block counts for a ViT with ``depth`` blocks; beta is None without reconstruction."""
        if depth < MIN_DEPTH:
            raise ValueError(
                f"token_clustering cannot apply to this model: it has {depth} block{'s' if depth != 1 else ''}, and "
                f"clustering needs at least {MIN_DEPTH} (one full-resolution block before the clustering, one on the "
                "clusters)"
            )
        alpha = depth // 2 if self.cluster_after is None else self.cluster_after
        if not 1 <= alpha < depth:
            raise ValueError(
                f"cluster_after={alpha} is out of range for this model's {depth} blocks; allowed: [1, {depth - 1}]"
            )
        if not self.reconstruct:
            return alpha, None
        after = -1 if self.reconstruct_after is None else self.reconstruct_after
        beta = after if after > 0 else depth + 1 + after
        if not alpha < beta <= depth:
            raise ValueError(
                f"reconstruct_after={after} (after block {beta}) is out of range for this model's {depth} blocks "
                f"with cluster_after={alpha}; allowed: {alpha + 1} ... {depth} or {alpha - depth} ... -1"
            )
        return alpha, beta

    def clustering(self) -> TokenClustering:
        return TokenClustering(self.num_clusters, self.iterations, self.temperature, self.relative_temperature,
                               self.window)

    def reconstruction(self) -> TokenReconstruction:
        return TokenReconstruction(self.k, self.recon_temperature, self.recon_norm)

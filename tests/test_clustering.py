"""Token clustering / reconstruction layers as pure tensor code, checked against straightforward re-derivations of the
paper's equations (docs/token_clustering.md) and for the properties the adapters rely on."""

import math

import pytest
import torch
import torch.nn.functional as F

from vtoken.methods.clustering import (
    TokenClustering,
    TokenClusteringConfig,
    TokenReconstruction,
    admissible_pairs,
    cluster_grid,
    local_mask,
    squared_distances,
)


def smooth_tokens(batch, grid, channels, seed=0):
    """Spatially correlated tokens (as ViT features are), plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, channels, 3, 3, generator=g)
    z = F.interpolate(coarse, size=grid, mode="bilinear", align_corners=False)
    z = z + 0.1 * torch.randn(z.shape, generator=g)
    return z.flatten(2).transpose(1, 2).contiguous()  # (B, N, C)


# -- geometry -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, grid, expected",
    [(144, (24, 24), (12, 12)), (0.25, (24, 24), (12, 12)), (0.25, (14, 14), (7, 7)), (1.0, (5, 7), (5, 7)),
     ((3, 4), (6, 8), (3, 4)), (0.5, (16, 8), (11, 6))],
)
def test_cluster_grid(spec, grid, expected):
    assert cluster_grid(spec, grid) == expected


@pytest.mark.parametrize("window", [1, 3, 5, 8])
@pytest.mark.parametrize("grid, clusters", [((24, 24), (12, 12)), ((14, 14), (7, 7)), ((5, 7), (5, 7)),
                                            ((6, 8), (3, 4)), ((16, 8), (11, 6)), ((9, 13), (2, 5)), ((3, 3), (1, 1))])
def test_admissible_pairs_counts_the_local_mask_from_the_geometry(grid, clusters, window):
    assert admissible_pairs(grid, clusters, window) == int(local_mask(grid, clusters, window).sum())


@pytest.mark.parametrize("grid, clusters, window", [((8, 8), (4, 4), 5), ((6, 10), (3, 5), 3), ((7, 9), (3, 4), 2)])
def test_auto_temperature_is_the_median_of_the_admissible_pairs_exactly(grid, clusters, window):
    """The median is taken without selecting the pairs (no size read from the device); it is the same value."""
    z = smooth_tokens(3, grid, 16)
    out = TokenClustering(clusters, iterations=0, relative_temperature=1.0, window=window)(z, grid)
    centers = F.adaptive_avg_pool2d(z.transpose(1, 2).reshape(3, 16, *grid), clusters).flatten(2).transpose(1, 2)
    dist = squared_distances(centers, z)
    median = dist[:, local_mask(grid, clusters, window)].median(dim=1).values
    assert torch.equal(out.temperature, 1.0 / median)


def test_cluster_grid_larger_than_input_is_an_error():
    with pytest.raises(ValueError, match=r"num_clusters=144 .*12x12 cluster grid, larger than .*8x8"):
        cluster_grid(144, (8, 8))


@pytest.mark.parametrize("grid, clusters, window", [((5, 7), (3, 4), 3), ((8, 8), (4, 4), 5), ((6, 4), (2, 3), 1)])
def test_local_mask_matches_the_spec_formula(grid, clusters, window):
    (H, W), (h, w), r = grid, clusters, window // 2
    expected = torch.zeros(h * w, H * W, dtype=torch.bool)
    for y in range(H):
        for x in range(W):
            label = (y * h // H) * w + (x * w // W)  # spec §3.3: nearest upsampling of the index grid
            for j in range(h * w):
                expected[j, y * W + x] = abs(j // w - label // w) <= r and abs(j % w - label % w) <= r
    assert torch.equal(local_mask(grid, clusters, window), expected)


# -- clustering -------------------------------------------------------------------------------------------------------
def reference_clustering(z, grid, clusters, iterations, t, window):
    """Straight from the paper: cdist, +1e16 on inadmissible pairs, softmax over centres, weighted means."""
    B, N, C = z.shape
    centers = F.adaptive_avg_pool2d(z.transpose(1, 2).reshape(B, C, *grid), clusters).flatten(2).transpose(1, 2)
    penalty = (~local_mask(grid, clusters, window)).double() * 1e16
    for _ in range(iterations):
        dist = torch.cdist(centers.double(), z.double()) ** 2 + penalty
        assign = torch.softmax(-t * dist, dim=1)
        centers = ((assign @ z.double()) / assign.sum(-1, keepdim=True)).float()
    return centers


@pytest.mark.parametrize("grid, clusters, iterations", [((6, 6), (3, 3), 5), ((5, 7), (2, 3), 3), ((8, 8), (4, 4), 1)])
def test_soft_kmeans_matches_reference(grid, clusters, iterations):
    z = smooth_tokens(2, grid, 16)
    out = TokenClustering(clusters, iterations, temperature=0.3, window=3)(z, grid)
    ref = reference_clustering(z, grid, clusters, iterations, 0.3, 3)
    torch.testing.assert_close(out.centers, ref, atol=1e-4, rtol=1e-4)
    assert out.grid == clusters


def test_zero_iterations_is_average_pooling_of_blocks():
    z = smooth_tokens(2, (6, 8), 8)
    out = TokenClustering((3, 4), iterations=0)(z, (6, 8)).centers
    blocks = z.view(2, 3, 2, 4, 2, 8).mean(dim=(2, 4)).reshape(2, 12, 8)  # 2x2 cells, raster order
    torch.testing.assert_close(out, blocks)


def test_auto_temperature_is_scale_free():
    z = smooth_tokens(2, (8, 8), 16)
    layer = TokenClustering(16, iterations=4)
    small, large = layer(z, (8, 8)), layer(z * 50.0, (8, 8))
    torch.testing.assert_close(large.centers, small.centers * 50.0, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(large.temperature * 2500.0, small.temperature, rtol=1e-4, atol=0)


def test_auto_temperature_sets_t_times_median_distance():
    z = smooth_tokens(1, (8, 8), 16)
    grid, clusters = (8, 8), (4, 4)
    out = TokenClustering(clusters, iterations=0, relative_temperature=7.0)(z, grid)
    centers = F.adaptive_avg_pool2d(z.transpose(1, 2).reshape(1, 16, 8, 8), clusters).flatten(2).transpose(1, 2)
    dist = torch.cdist(centers, z)[0] ** 2
    median = dist[local_mask(grid, clusters, 5)].median()
    assert math.isclose(out.temperature.item() * median.item(), 7.0, rel_tol=1e-3)


def test_half_precision_input_keeps_dtype_and_stays_finite():
    z = (smooth_tokens(1, (8, 8), 64) * 300).half()  # squared norms ~ 6e6: would overflow fp16 (max 65504)
    out = TokenClustering(16)(z, (8, 8))
    assert out.centers.dtype == torch.float16 and torch.isfinite(out.centers).all()
    affinity = TokenReconstruction(4).affinity(z, out)
    assert torch.isfinite(affinity).all()


def test_autocast_does_not_lower_the_distance_precision():
    z = smooth_tokens(2, (8, 8), 32) * 20
    layer, recon = TokenClustering(16), TokenReconstruction(5)
    ref = layer(z, (8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(z, (8, 8))
        affinity = recon.affinity(z, out)
    torch.testing.assert_close(out.centers, ref.centers)
    torch.testing.assert_close(affinity, recon.affinity(z, ref))


def test_clustering_batch_equals_singles():
    z = smooth_tokens(3, (8, 8), 16)
    layer, recon = TokenClustering(16), TokenReconstruction(5)
    batch = layer(z, (8, 8))
    batch_affinity = recon.affinity(z, batch)
    for i in range(3):
        single = layer(z[i : i + 1], (8, 8))
        torch.testing.assert_close(batch.centers[i : i + 1], single.centers, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch_affinity[i : i + 1], recon.affinity(z[i : i + 1], single), atol=1e-5,
                                   rtol=1e-5)


# -- reconstruction -------------------------------------------------------------------------------------------------
def test_identity_clustering_reconstructs_exactly():
    z = smooth_tokens(2, (6, 6), 16)
    out = TokenClustering(36, iterations=0)(z, (6, 6))
    assert torch.equal(out.centers, z)
    recon = TokenReconstruction(k=1)
    assert torch.equal(recon(out.centers, recon.affinity(z, out)), z)


def test_l2_affinity_matches_the_official_formula():
    z = smooth_tokens(2, (6, 6), 8)
    out = TokenClustering(9, temperature=0.5)(z, (6, 6))
    affinity = TokenReconstruction(k=4, norm="l2").affinity(z, out)
    weight = torch.exp(-0.5 * torch.cdist(z, out.centers) ** 2)  # spec §4: exp, top-k (ties kept), F.normalize
    kth = weight.topk(4, dim=-1).values[..., -1:]
    expected = F.normalize(torch.where(weight >= kth, weight, 0.0), dim=-1)
    torch.testing.assert_close(affinity, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("norm", ["sum", "l2"])
def test_affinity_rows_are_k_sparse_and_normalised(norm):
    z = smooth_tokens(2, (8, 8), 16)
    out = TokenClustering(16)(z, (8, 8))
    affinity = TokenReconstruction(k=5, norm=norm).affinity(z, out)
    assert ((affinity > 0).sum(-1) <= 5).all() and ((affinity > 0).sum(-1) >= 1).all()
    size = affinity.sum(-1) if norm == "sum" else affinity.norm(dim=-1)
    torch.testing.assert_close(size, torch.ones_like(size))
    # the biggest weight of each row sits on the nearest centre
    nearest = torch.cdist(z, out.centers_fp32).argmin(-1)
    assert torch.equal(affinity.argmax(-1), nearest)


def test_affinity_does_not_underflow_at_large_distances():
    """exp(-t * D) with D in the millions is 0 for every centre; the normalised weights must not be."""
    z = smooth_tokens(1, (8, 8), 16) * 1e3
    out = TokenClustering(16, temperature=1.0)(z, (8, 8))
    affinity = TokenReconstruction(k=3, norm="l2").affinity(z, out)
    torch.testing.assert_close(affinity.norm(dim=-1), torch.ones(1, 64))


def test_k_larger_than_clusters_uses_all_clusters():
    z = smooth_tokens(1, (4, 4), 8)
    out = TokenClustering(4)(z, (4, 4))
    affinity = TokenReconstruction(k=20, temperature=1e-3).affinity(z, out)
    assert (affinity > 0).all()


def test_reconstruction_keeps_the_feature_dtype_and_width():
    z = smooth_tokens(2, (8, 8), 16)
    out = TokenClustering(16)(z, (8, 8))
    recon = TokenReconstruction()
    y = torch.randn(2, 16, 5, dtype=torch.bfloat16)  # any width C', e.g. logits
    full = recon(y, recon.affinity(z, out))
    assert full.shape == (2, 64, 5) and full.dtype == torch.bfloat16


# -- config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_clusters=150), "num_clusters=150 is not a perfect square; .*144 or 169"),
        (dict(num_clusters=0), r"num_clusters=0 is out of range"),
        (dict(num_clusters=1.5), r"num_clusters=1.5 is out of range"),
        (dict(num_clusters=(3, 0)), r"pair of ints >= 1"),
        (dict(cluster_after=0), r"cluster_after=0 is out of range"),
        (dict(cluster_after=6, reconstruct_after=6), "reconstruct_after=6 must be larger than cluster_after=6"),
        (dict(cluster_after=8, reconstruct_after=4), "reconstruct_after=4 must be larger than cluster_after=8"),
        (dict(reconstruct=False, reconstruct_after=8), "reconstruct_after is only used with reconstruct=True"),
        (dict(reconstruct_after=0), "reconstruct_after=0 is out of range"),
        (dict(window=4), "window=4 must be odd"),
        (dict(iterations=-1), r"iterations=-1 is out of range"),
        (dict(temperature=0.0), r"temperature=0.0 is out of range"),
        (dict(relative_temperature=-1.0), r"relative_temperature=-1.0 is out of range; allowed: \(0.0, inf\)$"),
        (dict(relative_temperature=math.inf), r"relative_temperature=inf is out of range; allowed: \(0.0, inf\)$"),
        (dict(temperature=math.inf), r"temperature=inf is out of range; allowed: \(0.0, inf\)$"),
        (dict(recon_temperature=math.inf), r"recon_temperature=inf is out of range; allowed: \(0.0, inf\)$"),
        (dict(relative_temperature=math.nan), r"relative_temperature=nan is out of range"),
        (dict(k=0), r"k=0 is out of range"),
        (dict(recon_norm="max"), r"recon_norm='max' is not allowed; choose one of 'l2', 'sum'"),
        (dict(reconstruct="yes"), r"reconstruct='yes' is not allowed"),
    ],
)
def test_config_errors_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenClusteringConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, depth, expected",
    [
        (dict(), 12, (6, 12)),
        (dict(cluster_after=3, reconstruct_after=-2), 24, (3, 23)),
        (dict(cluster_after=3, reconstruct_after=10), 12, (3, 10)),
        (dict(cluster_after=11), 12, (11, 12)),
        (dict(cluster_after=2, reconstruct=False), 4, (2, None)),
    ],
)
def test_placement(kwargs, depth, expected):
    assert TokenClusteringConfig(**kwargs).placement(depth) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cluster_after=12), r"cluster_after=12 is out of range for this model's 12 blocks; allowed: \[1, 11\]"),
        (dict(cluster_after=6, reconstruct_after=13), r"reconstruct_after=13 \(after block 13\) is out of range"),
        (dict(cluster_after=6, reconstruct_after=-7), r"reconstruct_after=-7 \(after block 6\) is out of range .* "
                                                      r"allowed: 7 ... 12 or -6 ... -1"),
    ],
)
def test_placement_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenClusteringConfig(**kwargs).placement(12)


@pytest.mark.parametrize("kwargs", [dict(), dict(reconstruct=False), dict(cluster_after=1)])
def test_placement_on_a_one_block_model_says_it_is_too_shallow(kwargs):
    with pytest.raises(ValueError, match=r"token_clustering cannot apply to this model: it has 1 block, and "
                                         r"clustering needs at least 2 \(one full-resolution block before the "
                                         r"clustering, one on the clusters\)"):
        TokenClusteringConfig(**kwargs).placement(1)


@pytest.mark.parametrize("relative_temperature", [1e19, 1e30, 1e300])
def test_a_huge_finite_relative_temperature_stays_finite_on_identical_tokens(relative_temperature):
    """Identical tokens have median distance 0; t must stay finite, or -t * 0 is NaN."""
    config = TokenClusteringConfig(num_clusters=16, relative_temperature=relative_temperature)
    tokens = torch.ones(1, 64, 8)
    out = config.clustering()(tokens, (8, 8))
    assert torch.isfinite(out.temperature).all() and torch.isfinite(out.centers).all()
    affinity = config.reconstruction().affinity(tokens, out)
    assert torch.isfinite(affinity).all()
    torch.testing.assert_close(config.reconstruction()(out.centers, affinity), tokens)

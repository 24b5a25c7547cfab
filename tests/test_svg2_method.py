"""SVG2 pure tensor code: config validation, k-means, mass estimate, top-p selection, permutation, attention."""

import math

import pytest
import torch
import torch.nn.functional as F
from svg2_utils import one_thread  # noqa: F401  (autouse fixture)

import vtoken
from vtoken.kernels.svg2 import naive
from vtoken.methods.svg2 import (
    SVG2Config,
    allowed_pairs,
    cluster_mass,
    init_centroids,
    key_ranges,
    kmeans,
    permute_tokens,
    select_key_clusters,
    svg2_attention,
    unpermute_tokens,
)
from vtoken.timing import Stopwatch


def invert_permutation(order: torch.Tensor) -> torch.Tensor:
    """``inverse`` with ``inverse[:, order[:, r]] = r``."""
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ranks)


def clustered(bh=2, n=240, d=32, groups=6, spread=0.3, seed=0):
    """Tokens around ``groups`` well separated centres per head."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(bh, groups, d, generator=gen) * 3
    ids = torch.randint(0, groups, (bh, n), generator=gen)
    return centres.gather(1, ids.unsqueeze(-1).expand(-1, -1, d)) + spread * torch.randn(bh, n, d, generator=gen)


# -- config --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"top_p": 0.0}, r"top_p=0.0 is out of range; allowed: \(0.0, 1.0\]"),
        ({"top_p": 1.5}, "top_p=1.5 is out of range"),
        ({"top_p": "high"}, "top_p must be a number"),
        ({"q_clusters": 0}, "q_clusters=0 is out of range"),
        ({"k_clusters": 2.5}, "k_clusters must be an int"),
        ({"min_key_cluster_ratio": -0.1}, "min_key_cluster_ratio=-0.1 is out of range"),
        ({"dense_steps": -1}, "dense_steps=-1 is out of range"),
        ({"kmeans_step_iters": 0}, "kmeans_step_iters=0 is out of range"),
        ({"backend": "cuda"}, "backend='cuda' is not allowed"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SVG2Config(**kwargs)


def test_config_is_registered_with_defaults():
    info = vtoken.methods()["svg2"]
    assert info.hosts == ("wan", "hunyuan_video")
    fields = info.fields()
    assert fields["top_p"] == 0.9 and fields["q_clusters"] is None and fields["k_clusters"] is None
    assert SVG2Config().min_key_clusters == 50  # the generic 500 key clusters


@pytest.mark.parametrize("host,counts", [("wan", (300, 1000)), ("hunyuan_video", (400, 1000)), (None, (100, 500))])
def test_cluster_counts_default_per_model_and_the_users_stay(host, counts):
    """The official scripts' per-model counts, the paper's generic ones elsewhere; a count the user sets wins."""
    resolved = SVG2Config(top_p=0.8).for_model(host)
    assert (resolved.q_clusters, resolved.k_clusters) == counts and resolved.top_p == 0.8
    assert resolved.min_key_clusters == counts[1] // 10
    own = SVG2Config(q_clusters=7).for_model(host)
    assert (own.q_clusters, own.k_clusters) == (7, counts[1])


def test_unset_counts_mean_the_generic_ones_in_a_direct_call():
    q = torch.randn(1, 120, 16)
    with pytest.raises(ValueError, match="k_clusters=500 is larger than the 120 tokens"):
        svg2_attention(q, q, q, SVG2Config(q_clusters=4))
    out = svg2_attention(torch.randn(1, 600, 16), torch.randn(1, 600, 16), torch.randn(1, 600, 16),
                         SVG2Config(kmeans_init_iters=1, backend="torch"))
    assert out.q_clusters.centroids.shape[1] == 100 and out.k_clusters.centroids.shape[1] == 500


def test_cluster_counts_larger_than_tokens_are_errors():
    q = torch.randn(2, 20, 16)
    with pytest.raises(ValueError, match="q_clusters=30 is larger than the 20 tokens"):
        svg2_attention(q, q, q, SVG2Config(q_clusters=30, k_clusters=4))
    with pytest.raises(ValueError, match="k_clusters=21 is larger than the 20 tokens"):
        svg2_attention(q, q, q, SVG2Config(q_clusters=4, k_clusters=21))


# -- k-means -------------------------------------------------------------------------------------------------------


def test_kmeans_recovers_separated_groups_and_is_consistent():
    x = clustered()
    result = kmeans(x, 6, iters=10, generator=torch.Generator().manual_seed(1))
    labels, centroids, groups = result.labels, result.centroids, result.groups
    # returned centroids are the means of the returned clusters
    means, sizes = naive.kmeans_update_reference(x, labels, centroids)
    torch.testing.assert_close(centroids, means)
    assert torch.equal(groups.sizes, sizes) and torch.all(groups.sizes.sum(-1) == x.shape[1])
    # a warm start from converged centroids changes nothing
    again = kmeans(x, 6, iters=2, init=centroids)
    assert torch.equal(again.labels, labels)


def test_kmeans_seeded_init_is_reproducible_and_distinct():
    x = torch.randn(3, 50, 8)
    a = init_centroids(x, 50, torch.Generator().manual_seed(3))
    b = init_centroids(x, 50, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # k = N picks every token exactly once (no duplicated centroids, hence no forced empty clusters)
    assert torch.equal(a.sort(1).values, x.sort(1).values) or torch.allclose(
        torch.cdist(a, x).min(-1).values, torch.zeros(3, 50)
    )
    assert torch.unique(a[0], dim=0).shape[0] == 50


# -- mass estimate and selection -----------------------------------------------------------------------------------


def test_cluster_mass_is_size_weighted_softmax_over_key_centroids():
    cq, ck = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    sizes = torch.tensor([[4, 0, 1, 7, 2], [1, 1, 1, 1, 10]])
    mass = cluster_mass(cq, ck, sizes, scale=0.5)
    weights = sizes.unsqueeze(1) * torch.exp(0.5 * cq @ ck.transpose(1, 2))
    torch.testing.assert_close(mass, weights / weights.sum(-1, keepdim=True))
    assert torch.all(mass[0, :, 1] == 0)  # empty cluster


def test_select_key_clusters_smallest_set_reaching_top_p():
    mass = torch.tensor([[[0.5, 0.05, 0.3, 0.15]]])
    keep = lambda p, m=0: select_key_clusters(mass, p, m)[0, 0].tolist()  # noqa: E731
    assert keep(0.4) == [True, False, False, False]  # 0.5 crosses 0.4
    assert keep(0.5) == [True, False, True, False]  # mass before rank 2 is 0.5 <= 0.5
    assert keep(0.75) == [True, False, True, False]
    assert keep(0.9) == [True, False, True, True]  # mass before the last one is 0.95 > 0.9
    assert keep(0.96) == [True, True, True, True]
    assert keep(0.1, 3) == [True, False, True, True]  # minimum budget
    assert keep(1.0) == [True] * 4


def test_select_key_clusters_properties_on_random_rows():
    mass = torch.softmax(torch.randn(3, 7, 40) * 3, -1)
    for p in (0.3, 0.7, 0.95):
        keep = select_key_clusters(mass, p)
        kept_mass = (mass * keep).sum(-1)
        assert torch.all(kept_mass >= p - 1e-6)
        # dropping the smallest kept cluster falls to p or below: the set is minimal
        smallest = torch.where(keep, mass, torch.inf).min(-1).values
        assert torch.all(kept_mass - smallest <= p + 1e-6)


def test_key_ranges_cover_exactly_the_kept_clusters():
    sizes = torch.tensor([[3, 0, 2, 5, 1, 0, 4], [1, 2, 3, 4, 0, 0, 5]])
    offsets = F.pad(sizes.cumsum(-1), (1, 0))
    keep = torch.rand(2, 4, 7) < 0.5
    start, end, count = key_ranges(keep, offsets)
    covered = torch.stack([naive.ranges_to_mask(start[h], end[h], count[h], 15) for h in range(2)])
    expected = torch.zeros(2, 4, 15, dtype=torch.bool)
    for h in range(2):
        for j in range(7):
            expected[h, :, offsets[h, j] : offsets[h, j + 1]] |= keep[h, :, j, None]
    assert torch.equal(covered, expected)
    # runs merge: kept clusters 2, 3, 4 are one range
    run = key_ranges(torch.tensor([[[False, False, True, True, True, False, False]]]), offsets[:1])
    start, end, count = (t[0, 0] for t in run)
    assert count.item() == 1 and (start[0].item(), end[0].item()) == (3, 11)


# -- permutation and attention --------------------------------------------------------------------------------------


def test_permutation_and_inverse_are_identity():
    x = torch.randn(3, 37, 8)
    labels = torch.randint(0, 5, (3, 37))
    order = torch.sort(labels, dim=-1, stable=True).indices
    assert torch.equal(unpermute_tokens(permute_tokens(x, order), order), x)
    inverse = invert_permutation(order)
    assert torch.equal(permute_tokens(permute_tokens(x, order), inverse), x)
    assert torch.equal(order.gather(1, inverse), torch.arange(37).expand(3, -1))
    # permuted labels are sorted: clusters are contiguous
    assert torch.all(labels.gather(1, order).diff(dim=-1) >= 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_top_p_one_equals_dense_attention(backend):
    q, k, v = clustered(seed=1), clustered(seed=2), torch.randn(2, 240, 32)
    cfg = SVG2Config(top_p=1.0, q_clusters=5, k_clusters=9, kmeans_init_iters=3, backend=backend)
    out = svg2_attention(q, k, v, cfg, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.out, F.scaled_dot_product_attention(q, k, v), rtol=1e-4, atol=1e-4)
    assert torch.allclose(out.plan.density, torch.ones(2))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sparse_attention_equals_masked_dense_definition(backend):
    q, k, v = clustered(seed=3), clustered(seed=4), torch.randn(2, 240, 32)
    cfg = SVG2Config(top_p=0.6, q_clusters=6, k_clusters=12, min_key_cluster_ratio=0.0, kmeans_init_iters=3,
                     backend=backend)
    out = svg2_attention(q, k, v, cfg, generator=torch.Generator().manual_seed(0))
    mask = allowed_pairs(out.plan, out.q_clusters.labels, out.k_clusters.labels)
    want = naive.masked_attention_reference(q, k, v, mask, 1 / math.sqrt(32))
    torch.testing.assert_close(out.out, want, rtol=1e-4, atol=1e-4)
    density = mask.float().mean((1, 2))
    torch.testing.assert_close(out.plan.density, density)
    assert 0 < density.max() < 1  # genuinely sparse


def test_extra_keys_are_attended_by_every_query():
    q, k = clustered(n=120, seed=5), clustered(n=120, seed=6)
    extra_k, extra_v = torch.randn(2, 10, 32), torch.randn(2, 10, 32)
    v = torch.randn(2, 120, 32)
    valid = torch.tensor([7, 10])
    cfg = SVG2Config(top_p=0.5, q_clusters=4, k_clusters=8, kmeans_init_iters=3, backend="torch")
    out = svg2_attention(q, torch.cat([k, extra_k], 1), torch.cat([v, extra_v], 1), cfg, extra_keys=valid)
    mask = allowed_pairs(out.plan, out.q_clusters.labels, out.k_clusters.labels)
    extra_mask = (torch.arange(10) < valid[:, None]).unsqueeze(1).expand(-1, 120, -1)
    want = naive.masked_attention_reference(
        q, torch.cat([k, extra_k], 1), torch.cat([v, extra_v], 1), torch.cat([mask, extra_mask], -1), 32**-0.5
    )
    torch.testing.assert_close(out.out, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.plan.num_keys, 120 + valid)


def test_warm_start_uses_the_given_centroids_and_stopwatch_times_stages():
    q, k, v = clustered(seed=7), clustered(seed=8), torch.randn(2, 240, 32)
    cfg = SVG2Config(q_clusters=6, k_clusters=6, kmeans_init_iters=10, kmeans_step_iters=1, backend="torch")
    first = svg2_attention(q, k, v, cfg, generator=torch.Generator().manual_seed(0))
    watch = Stopwatch(q.device)
    second = svg2_attention(q, k, v, cfg, first.q_clusters.centroids, first.k_clusters.centroids, stopwatch=watch)
    assert torch.equal(second.q_clusters.labels, first.q_clusters.labels)
    laps = watch.laps()
    assert set(laps) == {"kmeans", "plan", "attention"} and all(t >= 0 for t in laps.values())

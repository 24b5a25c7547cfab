"""SVG2 kernels: each Triton kernel (run by the interpreter on CPU) against its PyTorch reference."""

import pytest
import torch
from svg2_utils import one_thread  # noqa: F401  (autouse fixture)

from vtoken.kernels import svg2 as K
from vtoken.kernels.svg2 import naive
from vtoken.kernels.svg2.sparse_attention import tile_table

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def distances(x, c):
    return torch.cdist(x.float(), c.float()).square()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k,d", [(150, 10, 24), (64, 70, 32)])  # masked tails; K over two centroid tiles
def test_kmeans_assign_triton_matches_reference(dtype, n, k, d):
    x = torch.randn(3, n, d).to(dtype)
    c = torch.randn(3, k, d)
    got = K.kmeans_assign(x, c, backend="triton")
    want = K.kmeans_assign(x, c, backend="torch")
    assert got.dtype == torch.int64 and got.shape == (3, n)
    dist = distances(x, c)
    # Labels may differ only on near-ties; the chosen centroid must be as close as the reference's.
    chosen = dist.gather(2, got.unsqueeze(-1))
    best = dist.gather(2, want.unsqueeze(-1))
    assert torch.allclose(chosen, best, rtol=1e-3, atol=1e-3)
    assert (got == want).float().mean() > 0.98


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kmeans_update_triton_matches_reference_with_empty_clusters(dtype):
    x = torch.randn(2, 130, 24).to(dtype)
    centroids = torch.randn(2, 9, 24)
    labels = torch.randint(0, 6, (2, 130))  # clusters 6..8 stay empty
    labels[1, :40] = 2  # one large cluster
    got, groups = K.kmeans_update(x, labels, centroids, backend="triton")
    want, sizes = naive.kmeans_update_reference(x, labels, centroids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[:, 6:], centroids[:, 6:])  # empty clusters keep their centroid
    assert torch.equal(groups.sizes, sizes)
    # groups: cluster c is order[offsets[c]:offsets[c+1]], all labelled c
    for h in range(2):
        for c in range(9):
            members = groups.order[h, groups.offsets[h, c] : groups.offsets[h, c + 1]]
            assert torch.all(labels[h, members] == c)


def random_plan(bh, nq, nk, cq, ck, density=0.4, extra=0):
    """Uneven (some empty) clusters, random kept blocks, ranges as ``make_plan`` builds them."""
    from vtoken.methods.svg2 import append_range, key_ranges

    def offsets(n, c):
        sizes = torch.distributions.Dirichlet(torch.full((c,), 0.7)).sample((bh,)) * n
        sizes = sizes.floor().long()
        sizes[:, 1] = 0  # an empty cluster
        sizes[:, -1] += n - sizes.sum(-1)
        return torch.nn.functional.pad(sizes.cumsum(-1), (1, 0))

    q_off, k_off = offsets(nq, cq), offsets(nk, ck)
    keep = torch.rand(bh, cq, ck) < density
    keep[..., 0] = True
    start, end, count = key_ranges(keep, k_off)
    if extra:
        start, end, count = append_range(start, end, count, torch.full((bh,), nk), torch.full((bh,), nk + extra))
    return q_off, k_off, keep, start, end, count


def element_mask(q_off, k_off, keep, extra, nk_total):
    """(BH, Nq, Nk) mask in the permuted layout, built directly from the block mask."""
    bh, cq, ck = keep.shape
    nq = int(q_off[0, -1])
    mask = torch.zeros(bh, nq, nk_total, dtype=torch.bool)
    for h in range(bh):
        for i in range(cq):
            for j in range(ck):
                if keep[h, i, j]:
                    mask[h, q_off[h, i] : q_off[h, i + 1], k_off[h, j] : k_off[h, j + 1]] = True
            mask[h, q_off[h, i] : q_off[h, i + 1], nk_total - extra :] = True
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d,extra", [(32, 0), (24, 5)])  # non-power-of-two head dim; always-kept extra keys
def test_varblock_attention_triton_matches_references(dtype, d, extra):
    bh, nq, nk, cq, ck = 2, 150, 140, 5, 11
    q_off, k_off, keep, start, end, count = random_plan(bh, nq, nk, cq, ck, extra=extra)
    q = torch.randn(bh, nq, d).to(dtype)
    k = torch.randn(bh, nk + extra, d).to(dtype)
    v = torch.randn(bh, nk + extra, d).to(dtype)
    scale = d**-0.5
    got = K.varblock_attention(q, k, v, q_off, start, end, count, scale, backend="triton")
    loop = K.varblock_attention(q, k, v, q_off, start, end, count, scale, backend="torch")
    dense = naive.masked_attention_reference(q, k, v, element_mask(q_off, k_off, keep, extra, nk + extra), scale)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), dense.float(), rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(loop.float(), dense.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_tile_table_covers_every_query_row_once():
    q_off = torch.tensor([[0, 0, 70, 71, 200], [0, 130, 130, 130, 200]])
    cluster, row, t_max = tile_table(q_off, 200, block_m=64)
    assert t_max == 4 + 4
    for h in range(2):
        covered = torch.zeros(200, dtype=torch.long)
        for c, r in zip(cluster[h].tolist(), row[h].tolist(), strict=True):
            if c < 0:
                continue
            end = min(r + 64, int(q_off[h, c + 1]))
            assert q_off[h, c] <= r < end
            covered[r:end] += 1
        assert torch.all(covered == 1)


def test_backend_argument_is_checked(monkeypatch):
    x = torch.randn(1, 8, 16)
    with pytest.raises(ValueError, match="backend='cuda' is not allowed"):
        K.kmeans_assign(x, x[:, :2], backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        K.kmeans_assign(x, x[:, :2], backend="triton")
    assert not K.use_triton(x, "auto")  # CPU tensors take the reference path

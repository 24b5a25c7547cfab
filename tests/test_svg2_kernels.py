"""SVG2 kernels: each Triton kernel (run by the interpreter on CPU) against its PyTorch reference."""

import pytest
import torch
from svg2_utils import one_thread  # noqa: F401  (autouse fixture)

from vtoken.kernels import svg2 as K
from vtoken.kernels.svg2 import naive, sparse_attention
from vtoken.kernels.svg2.sparse_attention import Tiling, tile_table, varblock_attention_triton

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
def test_kmeans_step_triton_matches_reference_with_empty_and_large_clusters(dtype):
    x = torch.randn(2, 130, 24).to(dtype)
    centroids = torch.randn(2, 9, 24)
    centroids[:, 6:] += 50.0  # far from every token: clusters 6..8 stay empty
    x[1, :40] = centroids[1, 2].to(dtype) + 0.01 * torch.randn(40, 24).to(dtype)  # one large cluster
    labels, got, sizes = K.kmeans_step(x, centroids, backend="triton")
    want_labels, want, want_sizes = K.kmeans_step(x, centroids, backend="torch")
    assert labels.dtype == torch.int64 and got.dtype == torch.float32
    assert torch.equal(labels, want_labels) and torch.equal(sizes, want_sizes) and sizes.dtype == torch.int64
    assert (labels[1, :40] == 2).all() and not (labels >= 6).any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[:, 6:], centroids[:, 6:])  # empty clusters keep their centroid
    assert torch.equal(want, naive.kmeans_update_reference(x, labels, centroids)[0])


def test_group_by_label_locates_every_cluster():
    labels = torch.randint(0, 6, (2, 130))  # clusters 6..8 stay empty
    groups = K.group_by_label(labels, 9)
    assert torch.equal(groups.sizes, naive.cluster_sizes(labels, 9))
    for h in range(2):
        for c in range(9):
            members = groups.order[h, groups.offsets[h, c] : groups.offsets[h, c + 1]]
            assert members.numel() == int((labels[h] == c).sum()) and torch.all(labels[h, members] == c)


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
    # another of the tuner's tilings: other tile tables, the same result
    other = varblock_attention_triton(q, k, v, q_off, start, end, count, scale, tiling=Tiling(32, 64, 8, 3))
    torch.testing.assert_close(other.float(), dense.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_the_tuner_times_each_shape_once_and_skips_tilings_that_do_not_fit(monkeypatch):
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(sparse_attention, "_TUNED", {})
    timings = {Tiling(64, 64): 2.0, Tiling(128, 64): 1.5, Tiling(128, 128): 0.5}
    measured = []

    def measure(tiling):
        measured.append(tiling)
        if tiling == Tiling(128, 128):
            raise OutOfResources(300_000, 232_448, "shared memory")
        return timings[tiling]

    assert sparse_attention.tuned_tiling(("shape", 1), list(timings), measure) == Tiling(128, 64)
    assert sparse_attention.tuned_tiling(("shape", 1), list(timings), measure) == Tiling(128, 64)
    assert len(measured) == 3  # timed once
    assert sparse_attention.tuned_tiling(("shape", 2), list(timings)[:1], measure) == Tiling(64, 64)
    with pytest.raises(RuntimeError, match="no tiling"):
        sparse_attention.tuned_tiling(("shape", 3), [Tiling(128, 128)], measure)
    assert all(t.block_m * t.block_n <= 64 * 64 for t in sparse_attention.candidate_tilings(torch.float32))


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


@pytest.mark.parametrize("extra_keys", [None, [5, 3]])  # extra rows: 5; the second head attends 3 of them
def test_the_flashinfer_block_layout_lets_attend_what_the_key_ranges_do(extra_keys):
    from vtoken.kernels.svg2.flashinfer_backend import block_layout
    from vtoken.kernels.svg2.flashinfer_backend import element_mask as layout_mask

    bh, nq, nk, cq, ck = 2, 150, 140, 5, 11
    extra = 0 if extra_keys is None else 5
    q_off, k_off, keep, start, end, count = random_plan(bh, nq, nk, cq, ck)
    if extra_keys is not None:
        from vtoken.methods.svg2 import append_range

        start, end, count = append_range(start, end, count, torch.full((bh,), nk), nk + torch.tensor(extra_keys))
    layout = block_layout(q_off.diff(dim=-1), k_off.diff(dim=-1), keep,
                          None if extra_keys is None else torch.tensor(extra_keys), extra)
    mask, rows, cols = layout
    assert rows.dtype == cols.dtype == torch.int32 and mask.dtype == torch.bool
    assert (rows.sum(-1) == nq).all() and (cols.sum(-1) == nk + extra).all()  # every head: all its rows and keys
    got = layout_mask(mask, rows, cols)
    for h in range(bh):  # query row t of head h sees what its cluster's key ranges cover
        ranges = naive.ranges_to_mask(start[h], end[h], count[h], nk + extra)
        assert torch.equal(got[h], ranges[torch.repeat_interleave(torch.arange(cq), q_off[h].diff())])


def test_svg2_refuses_the_flashinfer_backend_where_flashinfer_does_not_import(monkeypatch):
    from vtoken.kernels.svg2 import flashinfer_backend
    from vtoken.methods.svg2 import SVG2Config

    monkeypatch.setattr(flashinfer_backend, "available", lambda: False)
    monkeypatch.setattr("vtoken.methods.svg2.flashinfer_available", lambda: False)
    with pytest.raises(ValueError, match="backend='flashinfer' needs the flashinfer-python package"):
        SVG2Config(backend="flashinfer")
    with pytest.raises(ValueError, match="CUDA"):
        flashinfer_backend.flashinfer_attention(*(torch.zeros(1, 4, 16),) * 3, None, None, None, 0.25)


def test_a_warm_kmeans_iteration_is_a_few_launches_and_no_sync():
    from vtoken.evals.bench.overhead import OpCounter
    from vtoken.methods.svg2 import kmeans

    x, init = torch.randn(4, 512, 64), torch.randn(4, 32, 64)
    anchor = torch.nn.Identity()  # the counter splits at calls of a module
    with OpCounter(anchor) as counter:
        anchor(x)
        clusters = kmeans(x, 32, 1, init=init, backend="triton")
    (step,) = counter.segments
    # the fused step and means kernels, their buffers, and the label grouping (sort, cumsum, pad); the separate
    # assignment and update kernels with a sort between them took 16
    assert step.ops <= 8 and step.syncs == 0, step.sites
    assert torch.equal(clusters.groups.sizes, naive.cluster_sizes(clusters.labels, 32))

"""The baselines' tensor code (budget resolution, pooling plans) against plain definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import IMAGE_TOKEN, tiny_llava_next

import vtoken
from vtoken.budget import resolve_budget
from vtoken.methods.base import GridSegment, ImageContext
from vtoken.methods.baselines import PoolConfig, pooled_grid, split_budget


# -- budgets -----------------------------------------------------------------------------------------------------
def test_budget_resolution():
    assert resolve_budget(0.25, 576) == 144
    assert resolve_budget(0.1, 576) == 58  # rounds half up, the paper's "10 %"
    assert resolve_budget(0.001, 576) == 1
    assert resolve_budget(1.0, 576) == 576
    assert resolve_budget(64, 576) == 64
    with pytest.raises(ValueError, match="keep=577 is larger than the 576 visual tokens"):
        resolve_budget(577, 576)



# -- pooling -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,cols,budget,expected", [(24, 24, 64, (8, 8)), (24, 24, 58, (8, 7)),
                                                       (24, 24, 576, (24, 24)), (4, 8, 8, (2, 4))])
def test_pooled_grid(rows, cols, budget, expected):
    assert pooled_grid(rows, cols, budget) == expected


def test_pooled_grid_counts_separators():
    r, c = pooled_grid(6, 8, 20, newline=True)
    assert r * (c + 1) <= 20 and (r, c) == (4, 4)  # 16 patches + 4 separators


def test_split_budget_is_proportional_and_exact():
    assert split_budget(10, [64, 64]) == [5, 5]
    assert sum(split_budget(37, [64, 120, 9])) == 37


def test_pool_keeps_the_anyres_layout():
    """Thumbnail 4x4, high-res 4x6 with a separator after each row, one trailing extra token."""
    D = 3
    base = torch.arange(16 * D, dtype=torch.float32).view(16, D)
    hr = torch.randn(4, 6, D)
    newline = torch.full((1, D), -7.0)
    rows = torch.cat([hr, newline.expand(4, 1, D)], dim=1).reshape(-1, D)
    extra = torch.full((1, D), 5.0)
    feats = torch.cat([base, rows, extra])
    segments = [GridSegment(0, 4, 4), GridSegment(16, 4, 6, newline=True)]
    ctx = ImageContext(n=feats.shape[0], segments=segments)
    out = PoolConfig(keep=1.0).reduce(feats, ctx).features
    torch.testing.assert_close(out, feats)  # keep-all: exactly the input, layout included
    out = PoolConfig(keep=0.5).reduce(feats, ctx).features
    # budget 23 (46 * 0.5): extra 1 token, segments share 22 by length (16 : 28) -> 8 and 14
    r1, c1 = pooled_grid(4, 4, 8)
    r2, c2 = pooled_grid(4, 6, 14, newline=True)
    expected_base = F.adaptive_avg_pool2d(base.view(4, 4, D).permute(2, 0, 1), (r1, c1)).flatten(1).T
    pooled_hr = F.adaptive_avg_pool2d(hr.permute(2, 0, 1), (r2, c2)).permute(1, 2, 0)
    expected_hr = torch.cat([pooled_hr, newline.expand(r2, 1, D)], dim=1).reshape(-1, D)
    torch.testing.assert_close(out, torch.cat([expected_base, expected_hr, extra]))


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(1, 60), cols=st.integers(1, 60), newline=st.booleans(), data=st.data())
def test_pooled_grid_never_exceeds_the_budget(rows, cols, newline, data):
    sep = int(newline)
    budget = data.draw(st.integers(1 + sep, rows * (cols + sep) + 5), label="budget")
    r, c = pooled_grid(rows, cols, budget, newline)
    assert 1 <= r <= rows and 1 <= c <= cols
    assert r * (c + sep) <= budget


def test_pooled_grid_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="budget=1 cannot hold one pooled token and its row separator"):
        pooled_grid(4, 4, 1, newline=True)
    with pytest.raises(ValueError, match="a 8x0 grid has no patch to pool"):
        pooled_grid(8, 0, 5)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 500), min_size=1, max_size=4), data=st.data())
def test_split_budget_sums_to_the_budget_and_meets_every_minimum(sizes, data):
    minimums = data.draw(st.lists(st.integers(1, 2), min_size=len(sizes), max_size=len(sizes)), label="minimums")
    k = data.draw(st.integers(sum(minimums), sum(sizes) + 10), label="k")
    out = split_budget(k, sizes, minimums)
    assert sum(out) == k and all(o >= m for o, m in zip(out, minimums))


def anyres_layout(base: int, rows: int, cols: int, extras: int, D: int = 3):
    """Thumbnail base x base, then a rows x cols high-resolution grid with a separator per row, then extras."""
    segments = [GridSegment(0, base, base)]
    if rows:
        segments.append(GridSegment(base * base, rows, cols, newline=True))
    n = base * base + rows * (cols + 1) + extras
    return torch.randn(n, D), ImageContext(n=n, segments=segments)


@settings(max_examples=150, deadline=None)
@given(base=st.integers(1, 6), rows=st.integers(0, 8), cols=st.integers(0, 8), extras=st.integers(0, 2),
       data=st.data())
def test_pool_never_exceeds_the_budget_and_keep_all_is_the_identity(base, rows, cols, extras, data):
    features, ctx = anyres_layout(base, rows, cols, extras)
    keep = data.draw(st.integers(1, ctx.n), label="keep")
    out = PoolConfig(keep=keep).reduce(features, ctx).features
    assert 1 <= out.shape[0] <= keep
    torch.testing.assert_close(PoolConfig(keep=ctx.n).reduce(features, ctx).features, features, rtol=0, atol=0)
    torch.testing.assert_close(PoolConfig(keep=1.0).reduce(features, ctx).features, features, rtol=0, atol=0)


def test_pool_gives_a_tiny_budget_to_the_thumbnail():
    """Thumbnail 4x4 + high-res 4x6 with separators needs 3 tokens at least (1 + 1 patch and its separator)."""
    features, ctx = anyres_layout(4, 4, 6, extras=0)
    for keep in (1, 2):  # too small for both: the thumbnail alone, pooled to `keep` tokens
        out = PoolConfig(keep=keep).reduce(features, ctx).features
        r, c = pooled_grid(4, 4, keep)
        expected = F.adaptive_avg_pool2d(features[:16].view(4, 4, -1).permute(2, 0, 1), (r, c)).flatten(1).T
        torch.testing.assert_close(out, expected)
    out = PoolConfig(keep=3).reduce(features, ctx).features  # room for both: 1 + (1 patch, 1 separator)
    assert out.shape[0] == 3 and torch.equal(out[2], features[16 + 6])


@pytest.mark.parametrize("keep", [1, 2, 3, 0.5, 1.0])
@pytest.mark.parametrize("image_size", [[1000, 37], [37, 1000], [112, 84]])
def test_pool_on_llava_next_extreme_aspect_ratios(keep, image_size):
    """[1000, 37] unpads the high-resolution grid to 8 rows of 0 patches (8 separators, nothing to pool)."""
    model = tiny_llava_next()
    px, sizes = torch.randn(1, 5, 3, 56, 56), torch.tensor([image_size])
    with torch.no_grad():
        n = model.model.get_image_features(pixel_values=px, image_sizes=sizes, return_dict=True).pooler_output[0]
    n = n.shape[0]
    ids = torch.tensor([[1, 5, *([IMAGE_TOKEN] * n), 7, 8]])
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px, image_sizes=sizes).logits
    with vtoken.patch(model, "pool", keep=keep) as handle, torch.no_grad():
        out = model(input_ids=ids, pixel_values=px, image_sizes=sizes).logits
        kept = handle.stats.visual_tokens_kept[0]
    assert 1 <= kept <= resolve_budget(keep, n)
    if keep == 1.0 and isinstance(keep, float):  # keep-all: the unpatched model exactly
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)

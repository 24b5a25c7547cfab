"""ToDRE's selection: the greedy diversity rules against their definitions, the pivot, batched = one by one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import vtoken
from vtoken.kernels.diversity.naive import greedy_from_features
from vtoken.methods.base import GridSegment, ImageContext


# -- greedy diversity ----------------------------------------------------------------------------------------------
def naive_maxsum(x, k, pivot):
    chosen = [pivot]
    while len(chosen) < k:
        sums = {j: sum(float(x[j] @ x[c]) for c in chosen) for j in range(len(x)) if j not in chosen}
        chosen.append(min(sums, key=sums.get))
    return chosen


def naive_maxmin(x, k, pivot):
    chosen = [pivot]
    while len(chosen) < k:
        gaps = {j: min(1 - float(x[j] @ x[c]) for c in chosen) for j in range(len(x)) if j not in chosen}
        chosen.append(max(gaps, key=gaps.get))
    return chosen


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 40), d=st.integers(2, 16), frac=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_greedy_selection_matches_definition(n, d, frac, seed):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    k = max(1, int(frac * n))
    pivot = int(torch.randint(n, (), generator=g))
    pivots = torch.tensor([pivot])
    assert greedy_from_features(x[None], k, pivots, maxmin=False)[0].tolist() == naive_maxsum(x, k, pivot)
    assert greedy_from_features(x[None], k, pivots, maxmin=True)[0].tolist() == naive_maxmin(x, k, pivot)


def test_greedy_selection_returns_distinct_tokens_even_for_duplicates():
    x = F.normalize(torch.ones(1, 10, 4), dim=-1)  # all identical
    for maxmin in (False, True):
        picked = greedy_from_features(x, 10, torch.tensor([3]), maxmin)[0]
        assert sorted(picked.tolist()) == list(range(10))


def test_todre_pivot_is_the_cls_argmax_and_selection_is_sorted():
    cfg = vtoken.make_config(vtoken.methods()["todre"], dict(keep=5, stage2=False))
    feats = torch.randn(20, 8)
    scores = torch.full((20,), float("-inf"))
    scores[:16] = torch.rand(16)
    ctx = ImageContext(n=20, segments=[GridSegment(0, 4, 4)], pivot_scores=lambda: scores)
    red = cfg.reduce(feats, ctx)
    assert red.kept.tolist() == sorted(red.kept.tolist()) and len(red.kept) == 5
    assert int(scores.argmax()) in red.kept.tolist()
    torch.testing.assert_close(red.features, feats[red.kept])



@pytest.mark.parametrize("rule", ["maxsum", "maxmin"])
def test_todre_batched_selection_equals_image_by_image(rule):
    cfg = vtoken.make_config(vtoken.methods()["todre"], dict(keep=0.25, rule=rule, stage2=False))
    images = []
    for n in (16, 16, 36, 16):  # two lengths: grouped per length
        scores = torch.rand(n)
        images.append((torch.randn(n, 8), ImageContext(n=n, segments=[GridSegment(0, int(n**0.5), int(n**0.5))],
                                                       pivot_scores=lambda s=scores: s)))
    batched = cfg.reduce_batch(images)
    for (features, ctx), red in zip(images, batched):
        alone = cfg.reduce_batch([(features, ctx)])[0]
        assert torch.equal(red.kept, alone.kept) and torch.equal(red.features, alone.features)

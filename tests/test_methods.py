"""Method-level tensor code against plain definitions, and the recomputed attention against eager attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import IMAGE_TOKEN, left_pad, prompt, tiny_llava, tiny_llava_next

import vtoken
from vtoken.adapters._compat import clip_parts
from vtoken.adapters._vlm import DecoderPruner, VLMStats
from vtoken.adapters.llava import cls_attention
from vtoken.budget import resolve_budget
from vtoken.handle import Handle
from vtoken.kernels.diversity.naive import greedy_from_features
from vtoken.methods.base import GridSegment, ImageContext, VisualTokenMethod
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


# -- attention recomputed from a layer's input == the layer's own (eager) attention --------------------------------
def test_cls_attention_matches_eager_vision_attention():
    model = tiny_llava("eager")
    tower = model.model.vision_tower
    px = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        out = tower(px, output_hidden_states=True, output_attentions=True)
        layer = clip_parts(tower)[1][1]
        mine = cls_attention(layer, out.hidden_states[1])
    torch.testing.assert_close(mine, out.attentions[1][:, :, 0].mean(1), atol=1e-5, rtol=1e-4)


class _Probe(VisualTokenMethod):
    """Records the recomputed attention of every row at one layer, keeps everything."""

    method_name = "probe"

    def __init__(self, layer):
        self.keep, self.layer, self.seen = 1.0, layer, None

    def score_layers(self, num_layers):
        return (self.layer,)

    def prune(self, ctx):
        B, L = ctx.valid.shape
        rows = torch.arange(L).expand(B, -1)
        self.seen = ctx.attention(rows)
        self.weights = torch.rand(B, L) * ctx.valid
        self.received = ctx.received(rows, self.weights)
        return torch.ones(B, L, dtype=torch.bool)


@pytest.mark.parametrize("factory", [tiny_llava, tiny_llava_next])
def test_attention_rows_match_eager_attention_with_padding(factory):
    model = factory("eager")
    lm = model.model.language_model

    handle = Handle(lm, "probe", None, "test")
    probe = _Probe(layer=2)
    pruner = DecoderPruner(lm, probe, VLMStats(), handle)
    ids, mask = left_pad([torch.tensor([1, 5, 6, 7, 8, 9]), torch.tensor([1, 5, 6, 9])])
    visual = torch.zeros_like(ids, dtype=torch.bool)
    visual[:, 2] = True
    pruner.begin_prefill(visual, mask.bool())
    with torch.no_grad():
        out = lm(input_ids=ids, attention_mask=mask, output_attentions=True)
    handle.remove()
    expected = out.attentions[2]
    real = mask.bool()
    for b in range(2):
        rows = real[b].nonzero().squeeze(1)
        torch.testing.assert_close(probe.seen[b][:, rows][:, :, rows], expected[b][:, rows][:, :, rows],
                                   atol=1e-5, rtol=1e-4)
    # the scoring primitive: weighted over query rows, averaged over heads, never every row's probabilities at once
    received = torch.einsum("br,brk->bk", probe.weights, expected.mean(1).float())
    torch.testing.assert_close(probe.received, received, atol=1e-5, rtol=1e-4)


# -- stats: the token counts each layer sees are what the config says ----------------------------------------------
def test_token_counts_per_layer_follow_the_config():
    model = tiny_llava()
    ids = prompt(64).unsqueeze(0)  # 3 + 64 + 4 = 71 tokens
    px = torch.randn(1, 3, 112, 112)
    with vtoken.patch(model, "attn_topk", keep=8, layer=2) as h, torch.no_grad():
        model(input_ids=ids, pixel_values=px)
        assert h.stats.tokens_per_layer == [[71], [71], [15], [15]]
        assert h.stats.visual_tokens_per_layer == [[64], [64], [8], [8]]
        alive = h.stats.visual_alive[2][0]  # LLM-input positions of the 8 survivors: image tokens sit at 3..66
        assert len(alive) == 8 and all(3 <= p < 67 for p in alive) and alive == sorted(alive)
    with vtoken.patch(model, "todre", keep=16, tau=1.0, stage2_layer=1) as h, torch.no_grad():
        model(input_ids=ids, pixel_values=px)
        assert h.stats.visual_tokens_in == [64] and h.stats.visual_tokens_kept == [16]
        assert h.stats.tokens_per_layer == [[23], [23], [7], [7]]  # visual tokens gone after layer 1
        assert h.stats.records[1]["removed"] == [True]
        assert h.stats.selection_time_s > 0 and h.stats.scoring_time_s > 0
    with vtoken.patch(model, "pool", keep=0.1) as h, torch.no_grad():  # 6.4 -> 6 tokens: a 3x2 grid
        model(input_ids=ids, pixel_values=px)
        assert h.stats.visual_tokens_kept == [6] and h.stats.tokens_per_layer == [[13]] * 4


def test_two_images_in_one_prompt_are_reduced_separately():
    model = tiny_llava()
    ids = torch.cat([prompt(64), torch.full((64,), IMAGE_TOKEN), torch.tensor([11, 12])]).unsqueeze(0)
    px = torch.randn(2, 3, 112, 112)
    with vtoken.patch(model, "todre", keep=10, stage2=False) as h, torch.no_grad():
        out = model(input_ids=ids, pixel_values=px).logits
        assert h.stats.visual_tokens_kept == [10, 10] and h.stats.visual_tokens_llm == [20]
    assert out.shape[1] == ids.shape[1] - 108


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

"""DivPrune: the first pick and the greedy max-min selection against hand-worked and brute-force definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import prompt, tiny_llava, tiny_llava_next

import vtoken
from vtoken.kernels.diversity import cosine_similarities, greedy_select
from vtoken.methods.base import GridSegment, ImageContext
from vtoken.methods.divprune import DivPruneConfig, most_isolated


def context(n: int) -> ImageContext:
    return ImageContext(n=n, segments=[])


def at_angles(degrees, norms=None) -> torch.Tensor:
    """2-D points at the given angles: their cosine distance grows with the angle between them (up to 180)."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    points = torch.stack([rad.cos(), rad.sin()], dim=1)
    return points if norms is None else points * torch.tensor(norms, dtype=torch.float64)[:, None]


def brute_force_first_pick(x: torch.Tensor) -> int:
    n = len(x)
    isolation = [min(1 - float(x[i] @ x[j]) for j in range(n) if j != i) for i in range(n)]
    # largest; the lowest index on a tie, up to float64 rounding (two tokens are exactly as isolated as each other,
    # yet x[0] @ x[1] and x[1] @ x[0] may differ in the last bit)
    best = max(isolation)
    return min(i for i in range(n) if isolation[i] >= best - 1e-12)


def brute_force_divprune(features: torch.Tensor, k: int) -> list[int]:
    """Greedy max-min diversity written from the definition, on the float64 unit vectors."""
    x = F.normalize(features.double(), dim=-1)
    chosen = [brute_force_first_pick(x)]
    while len(chosen) < k:
        gaps = {j: min(1 - float(x[j] @ x[c]) for c in chosen) for j in range(len(x)) if j not in chosen}
        chosen.append(max(gaps, key=gaps.get))
    return chosen


def test_hand_worked_example():
    """Points at 0, 30, 100, 200 and 210 degrees. Nearest-neighbour angles: 30, 30, 70, 10, 10, so the first pick
    is the point at 100 (index 2). Then the farthest from {100} is 210 (110 degrees), then from {100, 210} it is 0
    (nearest kept 100 degrees away), then 30 (nearest kept: 0, 30 away), and 200 last (10 from 210). Lengths must
    not matter: the distance is the cosine's."""
    x = at_angles([0, 30, 100, 200, 210], norms=[1.0, 3.0, 0.5, 2.0, 7.0])
    unit = F.normalize(x.float(), dim=-1)[None]
    assert most_isolated(unit).tolist() == [2]
    assert greedy_select(unit, 5, most_isolated(unit), "maxmin").tolist() == [[2, 4, 0, 1, 3]]
    red = DivPruneConfig(keep=3).reduce(x.float(), context(5))
    assert red.kept.tolist() == [0, 2, 4]  # raster order, not pick order
    torch.testing.assert_close(red.features, x.float()[[0, 2, 4]])
    # ToDRE's max-min loop from another pivot picks a different set: the first pick matters
    assert sorted(greedy_select(unit, 3, torch.tensor([0]), "maxmin")[0].tolist()) != [0, 2, 4]


def test_hand_worked_example_in_3d():
    """Three near-parallel vectors (0, 1, 2) around the x axis, one along y (3), one along -z (4).

    Index 4 is orthogonal to 0, 1, 3 and points away from 2, so its nearest neighbour is 1 - 0 = 1 away; index 3
    is 1 - 0.1/sqrt(1.01) ~ 0.90 from index 1; the three near-parallel ones are < 0.01 from each other. First pick: 4.
    Farthest from {4}: index 2 (1 + 0.1/sqrt(1.01)). Then 3 (nearest kept 1 away), then 1 (1 - 1/1.01 ~ 0.0099 from
    index 2) before 0 (1 - 1/sqrt(1.01) ~ 0.0050 from index 2).
    """
    x = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [1.0, 0.0, 0.1], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
    unit = F.normalize(x, dim=-1)[None]
    assert most_isolated(unit).tolist() == [4]
    assert greedy_select(unit, 5, most_isolated(unit), "maxmin").tolist() == [[4, 2, 3, 1, 0]]
    assert DivPruneConfig(keep=2).reduce(x, context(5)).kept.tolist() == [2, 4]
    assert DivPruneConfig(keep=4).reduce(x, context(5)).kept.tolist() == [1, 2, 3, 4]


def test_ties_go_to_the_lowest_index():
    x = F.normalize(torch.ones(1, 6, 4), dim=-1)  # all identical: every token is equally (not) isolated
    assert most_isolated(x).tolist() == [0]
    square = at_angles([0, 90, 180, 270]).float()[None]  # every nearest neighbour is 90 degrees away
    assert most_isolated(square).tolist() == [0]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), d=st.integers(2, 16), seed=st.integers(0, 10_000), chunk=st.integers(1, 50))
def test_first_pick_equals_the_brute_force_definition(n, d, seed, chunk):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(3, n, d, generator=g), dim=-1)
    picks = most_isolated(x, chunk=chunk).tolist()
    assert picks == [brute_force_first_pick(x[b].double()) for b in range(3)]
    # read off the whole similarity matrix, as the Triton route hands it over
    assert most_isolated(x, gram=cosine_similarities(x, x)).tolist() == picks


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 40), d=st.integers(2, 16), frac=st.floats(0.05, 0.99), seed=st.integers(0, 10_000))
def test_selection_equals_brute_force_greedy_max_min(n, d, frac, seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g).add(0.1)  # lengths do not matter
    k = max(1, int(frac * n))
    red = DivPruneConfig(keep=k).reduce(features, context(n))
    assert red.kept.tolist() == sorted(brute_force_divprune(features, k))
    assert torch.equal(red.features, features[red.kept])


def test_a_batch_of_images_equals_each_image_alone():
    g = torch.Generator().manual_seed(3)
    images = [(torch.randn(n, 12, generator=g), context(n)) for n in (30, 17, 30, 30, 17, 5)]
    cfg = DivPruneConfig(keep=0.3)
    batched = cfg.reduce_batch(images)
    for (features, ctx), red in zip(images, batched):
        alone = cfg.reduce(features, ctx)
        assert torch.equal(red.kept, alone.kept) and torch.equal(red.features, alone.features)
        assert len(red.kept) == round(0.3 * ctx.n)


def test_keep_all_returns_the_input_and_budgets_resolve_like_the_other_methods():
    features = torch.randn(20, 8)
    ctx = ImageContext(n=20, segments=[GridSegment(0, 4, 5)])
    red = DivPruneConfig(keep=1.0).reduce(features, ctx)
    assert red.features is features and red.kept.tolist() == list(range(20))
    assert len(DivPruneConfig(keep=20).reduce(features, ctx).kept) == 20
    assert len(DivPruneConfig(keep=0.1).reduce(features, ctx).kept) == 2
    with pytest.raises(ValueError, match="keep=21 is larger than the 20 visual tokens"):
        DivPruneConfig(keep=21).reduce(features, ctx)
    with pytest.raises(ValueError, match="backend='cuda' is not allowed"):
        DivPruneConfig(backend="cuda")
    with pytest.raises(ValueError, match="keep=0 is out of range"):
        DivPruneConfig(keep=0)


def test_registered_for_the_vlm_hosts():
    info = vtoken.methods()["divprune"]
    assert info.config_cls is DivPruneConfig
    assert set(info.hosts) == {"internvl", "llava", "llava_next", "llava_onevision", "qwen_vl"}
    assert info.stages == ("boundary",)


# -- the Triton kernel (interpreter on CPU) gives the same tokens ----------------------------------------------------
def test_triton_backend_gives_the_same_selection():
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(5)
    images = [(torch.randn(n, 16, generator=g), context(n)) for n in (37, 37, 64, 130)]
    torch_path = DivPruneConfig(keep=0.2, backend="torch").reduce_batch(images)
    triton_path = DivPruneConfig(keep=0.2, backend="triton").reduce_batch(images)
    for a, b in zip(torch_path, triton_path):
        assert torch.equal(a.kept, b.kept)


@pytest.mark.parametrize("factory", [tiny_llava, tiny_llava_next])
def test_triton_backend_on_a_model(factory):
    pytest.importorskip("triton")
    model = factory()
    if factory is tiny_llava:
        inputs = dict(input_ids=prompt(64).unsqueeze(0), pixel_values=torch.randn(1, 3, 112, 112))
    else:
        from tiny_models import visual_count

        px, sizes = torch.randn(1, 5, 3, 56, 56), torch.tensor([[112, 84]])
        n = visual_count(model, px, sizes)[0]
        inputs = dict(input_ids=prompt(n).unsqueeze(0), pixel_values=px, image_sizes=sizes)
    kept = {}
    for backend in ("torch", "triton"):
        with vtoken.patch(model, "divprune", keep=0.2, backend=backend) as h, torch.no_grad():
            model(**inputs)
            kept[backend] = h.stats.kept_indices[0]
    assert torch.equal(kept["torch"], kept["triton"])

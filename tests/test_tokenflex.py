"""TokenFLEX: the token-adaptive projector (pure tensor code) and its attachment to LLaVA / LLaVA-NeXT."""

from __future__ import annotations

import math

import pytest
import torch
from test_llava_invariants import Host, greedy, logits
from tiny_models import IMAGE_TOKEN, prompt, tiny_llava, tiny_llava_next, visual_count

import vtoken
from vtoken.adapters import _compat
from vtoken.adapters.llava import unpadded_grid
from vtoken.methods.tokenflex import (
    TokenFlexConfig,
    TokenFlexProjector,
    check_counts,
    pool_grid,
    resolve_num_tokens,
    scaled_counts,
)


def squares(side: int) -> list[int]:
    return [n * n for n in range(1, side + 1)]


# -- pooling and the projector ------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", [4, 8, 14, 27])
def test_every_square_count_gives_that_many_tokens(side):
    features = torch.randn(3, side * side, 16)
    projector = TokenFlexProjector(16, 24)
    for N in squares(side):
        assert pool_grid(features, N).shape == (3, N, 16)
        assert projector(features, N).shape == (3, N, 24)


def test_native_count_is_the_identity_and_pooling_averages_blocks():
    features = torch.randn(2, 64, 8)
    assert pool_grid(features, 64) is features
    # 8 x 8 -> 4 x 4 needs no resize: each output token is the mean of its 2 x 2 block
    blocks = features.view(2, 4, 2, 4, 2, 8).mean(dim=(2, 4)).reshape(2, 16, 8)
    torch.testing.assert_close(pool_grid(features, 16), blocks)
    torch.testing.assert_close(pool_grid(features, 1), features.mean(1, keepdim=True))


def test_a_grid_that_n_does_not_divide_is_resized_bilinearly_first():
    """14 x 14 -> 4 x 4: resized to 16 x 16 with aligned corners, then 4 x 4 blocks. A linear ramp stays linear under
    that resize, so output column b is the ramp at the mean resized position of block b: (4b + 1.5) * 13 / 15."""
    ramp = torch.arange(14.0).repeat(14, 1)  # value = column
    out = pool_grid(ramp.reshape(1, 196, 1), 16).view(4, 4)
    expected = (4 * torch.arange(4.0) + 1.5) * 13 / 15
    torch.testing.assert_close(out, expected.expand(4, 4))
    constant = torch.full((1, 196, 3), 2.5)
    torch.testing.assert_close(pool_grid(constant, 36), torch.full((1, 36, 3), 2.5))


def test_the_projector_is_layer_norm_then_swiglu():
    torch.manual_seed(0)
    projector = TokenFlexProjector(8, 5, hidden_ratio=2)
    x = torch.randn(2, 4, 8)
    u = torch.nn.functional.layer_norm(x, (8,), projector.norm.weight, projector.norm.bias, 1e-5)
    a, g = projector.gate(u), projector.up(u)
    expected = projector.down(a * torch.sigmoid(a) * g)
    torch.testing.assert_close(projector.project(x), expected)
    assert projector.gate.out_features == 16 and sum(p.numel() for p in projector.parameters()) == (
        2 * 8 + 2 * (8 * 16 + 16) + 16 * 5 + 5)


def test_a_batch_equals_single_views():
    projector = TokenFlexProjector(16, 24)
    features = torch.randn(5, 196, 16)
    for N in (4, 36, 100, 196):
        batch = projector(features, N)
        singles = torch.cat([projector(features[i : i + 1], N) for i in range(5)])
        torch.testing.assert_close(batch, singles, atol=1e-6, rtol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    projector = TokenFlexProjector(16, 24, hidden_ratio=2)
    projector.save(tmp_path / "p")
    loaded = TokenFlexProjector.load(tmp_path / "p")
    assert loaded.settings() == projector.settings()
    for (name, a), (_, b) in zip(projector.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    projector.save(tmp_path / "half", dtype=torch.float16)
    half = TokenFlexProjector.load(tmp_path / "half")
    assert half.down.weight.dtype == torch.float32
    torch.testing.assert_close(half.down.weight, projector.down.weight.half().float())
    assert (tmp_path / "half" / "projector.pt").stat().st_size < (tmp_path / "p" / "projector.pt").stat().st_size


@pytest.mark.parametrize("num_tokens,message", [
    (10, "num_tokens=10 is not a perfect square.*9 or 16"),
    (0, r"num_tokens=0 is out of range; allowed: \[1, inf\]"),
    (True, "num_tokens must be an int"),
    ("16", "num_tokens must be an int"),
    (1.5, r"num_tokens=1.5 is out of range: a float is the share .* in \(0, 1\]"),
    (0.0, "num_tokens=0.0 is out of range"),
])
def test_bad_counts_are_refused_at_config_time(num_tokens, message):
    with pytest.raises(ValueError, match=message):
        TokenFlexConfig(num_tokens=num_tokens)


def test_counts_larger_than_the_grid_and_bad_grids_are_refused():
    with pytest.raises(ValueError, match=r"num_tokens=81 is larger than the 64 patch tokens \(8x8\)"):
        resolve_num_tokens(81, 64)
    with pytest.raises(ValueError, match=r"num_tokens=225 is larger than the 196 patch tokens \(14x14\)"):
        pool_grid(torch.randn(1, 196, 4), 225)
    with pytest.raises(ValueError, match="square patch grid; got 197 tokens"):
        pool_grid(torch.randn(1, 197, 4), 16)
    with pytest.raises(ValueError, match="reads 16-wide vision features; got 8"):
        TokenFlexProjector(16, 8)(torch.randn(1, 16, 8), 4)
    assert resolve_num_tokens(0.25, 196) == 49 and resolve_num_tokens(0.1, 196) == 16
    assert resolve_num_tokens(1.0, 196) == 196 and resolve_num_tokens(0.001, 196) == 1


def test_the_paper_distribution_scales_to_the_grid():
    assert scaled_counts(27 * 27) == {64: 0.2, 144: 0.3, 256: 0.5}
    assert scaled_counts(14 * 14) == {16: 0.2, 36: 0.3, 64: 0.5}
    assert scaled_counts(24 * 24) == {49: 0.2, 121: 0.3, 196: 0.5}
    assert scaled_counts(4 * 4) == {1: 0.2, 4: 0.8}  # counts that meet add their weights
    assert check_counts({36: 1, 100: 3}) == {36: 0.25, 100: 0.75}
    with pytest.raises(ValueError, match="token_counts: count=50 is not a perfect square"):
        check_counts({50: 1.0})
    with pytest.raises(ValueError, match="token_counts: count 100 has weight -1"):
        check_counts({100: -1})
    with pytest.raises(ValueError, match="token_counts: count=81 is larger than the 64"):
        check_counts({81: 1.0}, native=64)


def test_a_projector_path_that_is_not_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a saved TokenFLEX projector"):
        TokenFlexConfig(num_tokens=16, projector=tmp_path)
    with pytest.raises(ValueError, match="projector must be None .* got Linear"):
        TokenFlexConfig(num_tokens=16, projector=torch.nn.Linear(2, 2))


# -- on LLaVA / LLaVA-NeXT -------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llava", "llava_next"])
def host(request):
    return Host(request.param)


def native(model) -> int:
    vc = model.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


def test_training_free_at_the_native_count_is_the_unpatched_model(host):
    """N = the native grid pools nothing: the model's own projector and LLaVA-NeXT's own packing come back exactly."""
    for i in range(3):
        inputs = host.single(i)
        ref, ref_tokens = logits(host.model, **inputs), greedy(host.model, **inputs)
        with vtoken.patch(host.model, "tokenflex", num_tokens=native(host.model)) as handle:
            assert torch.equal(logits(host.model, **inputs), ref)
            assert torch.equal(greedy(host.model, **inputs), ref_tokens)
            assert handle.stats.visual_tokens_llm == [host.counts[i]]


class PlainProjector(torch.nn.Module):
    """A TokenFLEX projector without its pooling, as a model's own projector."""

    def __init__(self, projector):
        super().__init__()
        self.projector = projector

    def forward(self, x):
        return self.projector.project(x)


def test_a_trained_projector_at_the_native_count_equals_it_as_a_plain_projector(host):
    torch.manual_seed(3)
    projector = TokenFlexProjector(32, 64)
    with torch.no_grad():  # an identity-like start: unit norm scale, small MLP, so the LLM sees moderate inputs
        for linear in (projector.gate, projector.up, projector.down):
            linear.weight.mul_(0.1)
    inputs = host.single(0)
    with vtoken.patch(host.model, "tokenflex", num_tokens=native(host.model), projector=projector):
        patched = logits(host.model, **inputs)
    original = host.model.model.multi_modal_projector
    host.model.model.multi_modal_projector = PlainProjector(projector)
    try:
        plain = logits(host.model, **inputs)
    finally:
        host.model.model.multi_modal_projector = original
    torch.testing.assert_close(patched, plain, atol=1e-6, rtol=0)


def test_fewer_tokens_equal_the_unpatched_llm_on_the_pooled_features():
    """LLaVA-1.5, N = 16 of 64: the LLM gets exactly the prompt a processor would build for 16 tokens holding the
    model's own projector on the pooled grid (training-free) or the trained projector's output."""
    model = tiny_llava()
    ids, pixels = prompt(64).unsqueeze(0), torch.randn(1, 3, 112, 112)
    projector = TokenFlexProjector(32, 64)
    with torch.no_grad():
        features = _compat.vision_features(model.model, pixels, -2, "default")
        pooled = pool_grid(features, 16)
        for trained, expected_features in ((None, model.model.multi_modal_projector(pooled)),
                                           (projector, projector(features, 16))):
            with vtoken.patch(model, "tokenflex", num_tokens=16, projector=trained) as handle:
                out = model(input_ids=ids, pixel_values=pixels).logits
                assert handle.stats.visual_tokens_llm == [16]
            short = torch.cat([ids[0, :3], torch.full((16,), IMAGE_TOKEN), ids[0, 67:]])
            embeds = model.model.get_input_embeddings()(short).clone()
            embeds[short == IMAGE_TOKEN] = expected_features[0]
            torch.testing.assert_close(out, model(inputs_embeds=embeds[None]).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [[112, 84], [56, 56], [84, 112], [112, 30], [20, 112]])
@pytest.mark.parametrize("num_tokens", [1, 4, 9, 16])
def test_llava_next_packs_n_tokens_per_view_like_its_own_layout(size, num_tokens):
    """Thumbnail N tokens, then the pooled tile grid unpadded by LLaVA-NeXT's own rule at side n, one newline per
    row: the count follows transformers' unpad_image on a grid of that side."""
    llava_next = pytest.importorskip("transformers.models.llava_next.modeling_llava_next")
    model = tiny_llava_next()
    sizes = torch.tensor([size])
    pixels = torch.randn(1, 5, 3, 56, 56)
    n = math.isqrt(num_tokens)
    pinpoints, tile = model.config.image_grid_pinpoints, model.config.vision_config.image_size
    high, wide = llava_next.get_anyres_image_grid_shape(size, pinpoints, tile)
    rows, cols = llava_next.unpad_image(torch.empty(1, high * n, wide * n), sizes[0]).shape[1:]
    assert (rows, cols) == unpadded_grid(size, pinpoints, tile, n)
    ids = prompt(visual_count(model, pixels, sizes)[0]).unsqueeze(0)
    with vtoken.patch(model, "tokenflex", num_tokens=num_tokens) as handle, torch.no_grad():
        model(input_ids=ids, pixel_values=pixels, image_sizes=sizes)
        assert handle.stats.visual_tokens_llm == [num_tokens + rows * (cols + 1)]
        tokens = model.generate(input_ids=ids, pixel_values=pixels, image_sizes=sizes, attention_mask=torch.ones_like(
            ids), max_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
    assert tokens.shape[1] == ids.shape[1] + 3


def test_llava_next_tiles_hold_their_pooled_features_in_order():
    """The packed sequence is the thumbnail's pooled tokens, then row r of the pooled tile grid and a newline."""
    model = tiny_llava_next()
    sizes, pixels = torch.tensor([[56, 112]]), torch.randn(1, 5, 3, 56, 56)  # 1 x 2 tiles, no padding to cut
    with vtoken.patch(model, "tokenflex", num_tokens=4), torch.no_grad():
        packed = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes, return_dict=True)
        packed = packed.pooler_output[0][:20]  # padded to the full count: the real tokens come first
        views = _compat.vision_features(model.model, pixels[0, :3], -2, "default")
        projected = model.model.multi_modal_projector(views)  # the pooled projector while patched
    newline = model.model.image_newline
    tiles = torch.cat([projected[1].view(2, 2, -1), projected[2].view(2, 2, -1)], dim=1)  # 2 rows x 4 cols
    expected = torch.cat([projected[0], torch.cat([tiles, newline.expand(2, 1, -1)], dim=1).reshape(10, -1)])
    torch.testing.assert_close(packed[:14], expected, atol=1e-6, rtol=0)


def test_the_count_changes_between_calls_without_re_patching(host):
    inputs = host.single(0)
    counts = (4, 1, 9, 4)
    with vtoken.patch(host.model, "tokenflex", num_tokens=counts[0]) as handle:
        switched = []
        for num_tokens in counts:
            handle.update(num_tokens=num_tokens)
            switched.append((logits(host.model, **inputs), greedy(host.model, **inputs)))
            assert handle.config.num_tokens == num_tokens
    for num_tokens, (out, tokens) in zip(counts, switched):
        with vtoken.patch(host.model, "tokenflex", num_tokens=num_tokens):
            assert torch.equal(logits(host.model, **inputs), out)
            assert torch.equal(greedy(host.model, **inputs), tokens)
    assert switched[0][0].shape[1] > switched[1][0].shape[1]


def test_an_update_is_checked_before_anything_changes(host):
    inputs = host.single(0)
    projector = TokenFlexProjector(32, 64)
    with vtoken.patch(host.model, "tokenflex", num_tokens=4) as handle:
        untrained = logits(host.model, **inputs)
        handle.update(projector=projector)
        trained = logits(host.model, **inputs)
        assert not torch.equal(trained, untrained)
        for changes, message in ((dict(num_tokens=10), "num_tokens=10 is not a perfect square"),
                                 (dict(num_tokens=4 * native(host.model)), "is larger than the"),
                                 (dict(keep=4), r"unknown argument\(s\) 'keep' .* valid arguments: num_tokens, "
                                                "projector"),
                                 (dict(projector=TokenFlexProjector(32, 48)), "projector maps 32-wide vision features "
                                                                             "to a 48-wide LLM")):
            with pytest.raises(ValueError, match=message):
                handle.update(**changes)
            assert torch.equal(logits(host.model, **inputs), trained) and handle.config.projector is projector
        handle.update(projector=None)
        assert torch.equal(logits(host.model, **inputs), untrained)
    with pytest.raises(RuntimeError, match="was removed"):
        handle.update(num_tokens=4)
    with vtoken.patch(host.model, "pool", keep=0.25) as other, pytest.raises(ValueError, match="cannot change"):
        other.update(keep=0.5)


def test_errors_name_the_argument_and_what_is_allowed(host):
    model = host.model
    grid = math.isqrt(native(model))
    with pytest.raises(ValueError, match=rf"num_tokens={(grid + 1) ** 2} is larger than the {native(model)} patch "
                                         rf"tokens \({grid}x{grid}\) per view"):
        vtoken.patch(model, "tokenflex", num_tokens=(grid + 1) ** 2)
    with pytest.raises(ValueError, match="projector maps 16-wide vision features to a 64-wide LLM, but this model's "
                                         "projector reads 32-wide features and its LLM is 64 wide"):
        vtoken.patch(model, "tokenflex", num_tokens=4, projector=TokenFlexProjector(16, 64))
    assert "multi_modal_projector" not in model.model.__dict__ and not model.model._forward_pre_hooks


def test_the_cls_token_strategy_is_refused():
    model = tiny_llava(strategy="full")
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
        vtoken.patch(model, "tokenflex", num_tokens=16)


def test_remove_restores_the_model_and_its_state_dict(host):
    inputs = host.single(1)
    ref = logits(host.model, **inputs)
    state = {k: v.clone() for k, v in host.model.state_dict().items()}
    with vtoken.patch(host.model, "tokenflex", num_tokens=4, projector=TokenFlexProjector(32, 64)):
        assert host.model.state_dict().keys() == state.keys()  # the pooled projector is outside the module tree
        assert not torch.equal(logits(host.model, **inputs)[:, -1], ref[:, -1])
    for name in ("multi_modal_projector", "pack_image_features", "get_image_features"):
        assert name not in host.model.model.__dict__
    assert torch.equal(logits(host.model, **inputs), ref)
    assert all(torch.equal(v, state[k]) for k, v in host.model.state_dict().items())


def test_a_saved_projector_is_loaded_from_its_folder(host, tmp_path):
    projector = TokenFlexProjector(32, 64)
    projector.save(tmp_path / "tap")
    inputs = host.single(0)
    with vtoken.patch(host.model, "tokenflex", num_tokens=4, projector=projector):
        from_module = logits(host.model, **inputs)
    with vtoken.patch(host.model, "tokenflex", num_tokens=4, projector=str(tmp_path / "tap")):
        assert torch.equal(logits(host.model, **inputs), from_module)


@pytest.mark.parametrize("name", ["attn_topk", "random", "pool", "todre"])
@pytest.mark.parametrize("order", ["tokenflex first", "method first"])
def test_composes_with_llm_side_methods(host, name, order):
    """The LLM-side method works on TokenFLEX's N tokens per view, in either installation order."""
    inputs = host.single(0)
    ref = logits(host.model, **inputs)
    with vtoken.patch(host.model, "tokenflex", num_tokens=9) as alone:
        logits(host.model, **inputs)
        provided = alone.stats.visual_tokens_llm[0]
    apply = {"tokenflex": lambda: vtoken.patch(host.model, "tokenflex", num_tokens=9),
             "method": lambda: vtoken.patch(host.model, name, keep=0.5)}
    handles = [apply[k]() for k in (("tokenflex", "method") if order == "tokenflex first" else ("method", "tokenflex"))]
    try:
        logits(host.model, **inputs)
        stats = handles[0].stats
        assert stats.visual_tokens_in == [provided]
        assert stats.visual_tokens_per_layer[-1][0] <= math.ceil(provided / 2)
        assert greedy(host.model, **inputs).shape[1] == 5
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(logits(host.model, **inputs), ref)


def test_tokenflex_and_a_clustering_tower_share_one_slot():
    model = tiny_llava(image_size=224, vision_layers=4)
    with vtoken.patch(model, "token_clustering", num_clusters=0.25, reconstruct=False):
        with pytest.raises(ValueError, match="already patched with 'token_clustering'"):
            vtoken.patch(model, "tokenflex", num_tokens=16)
    with vtoken.patch(model, "tokenflex", num_tokens=16):
        with pytest.raises(ValueError, match="already patched with 'tokenflex'"):
            vtoken.patch(model, "token_clustering", num_clusters=0.25, reconstruct=False)


def test_quality_measures_tokenflex_at_its_share_of_the_grid(tiny_shapes_checkpoint, tmp_path):
    import argparse
    import json

    from vtoken.evals.common import methods
    from vtoken.evals.shapes import quality

    assert methods.budget_config("tokenflex", 0.25) == {"num_tokens": 0.25}
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    out = tmp_path / "q.json"
    args = parser.parse_args(["--task", "shapes", "--model", str(tiny_shapes_checkpoint), "--n", "4", "--budgets",
                              "1.0,0.25,0.1", "--batch-size", "4", "--method", "tokenflex", "--json", str(out),
                              "--plot", str(tmp_path / "q.png"), "--quiet", "--threads", "1"])
    assert quality.run(args) == 0
    report = json.loads(out.read_text())
    tokens = {r["budget"]: r["visual_tokens"] for r in report["results"]}
    assert tokens == {1.0: 196, 0.25: 49, 0.1: 16}  # 14 x 14 -> 7 x 7 -> 4 x 4
    assert report["results"][0]["accuracy"] == report["dense"]["accuracy"]  # the native count is the model itself


def test_a_users_projector_is_never_cast_in_place_by_a_bf16_model():
    model = tiny_llava().to(torch.bfloat16)
    projector = TokenFlexProjector(32, 64)
    before = {k: v.clone() for k, v in projector.state_dict().items()}
    ids, pixels = prompt(64).unsqueeze(0), torch.randn(1, 3, 112, 112, dtype=torch.bfloat16)
    with vtoken.patch(model, "tokenflex", num_tokens=16, projector=projector), torch.no_grad():
        first = model(input_ids=ids, pixel_values=pixels).logits
        assert first.dtype == torch.bfloat16
        after = projector.state_dict()
        assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in after.items())
        projector.down.bias.add_(1.0)  # the user changes their weights in place: the next call uses the new ones
        assert not torch.equal(model(input_ids=ids, pixel_values=pixels).logits, first)

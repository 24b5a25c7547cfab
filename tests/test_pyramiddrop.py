"""PyramidDrop: its schedule against the release's numbers, its errors, and the whole method against a plain loop
of the release's algorithm. The invariants run from the tables in test_llava_invariants.py and test_qwen_vl.py."""

from __future__ import annotations

import plain_decoder
import pytest
import torch
from tiny_models import IMAGE_TOKEN, tiny_llava

import vtoken
from vtoken.methods.pyramiddrop import PyramidDropConfig, stage_counts


def test_the_default_is_the_release_schedule():
    cfg = PyramidDropConfig()
    assert cfg.schedule(32) == ((8, 16, 24), (1, 2, 3))
    assert stage_counts(576, 72, (1, 2, 3)) == [288, 144, 72]  # the release's int(576 * 0.5^s)
    assert stage_counts(2880, 360, (1, 2, 3)) == [1440, 720, 360]
    # another budget: lambda^3 = keep / N, floored like the release, the last stage exactly at the budget
    assert stage_counts(576, 64, (1, 2, 3)) == [276, 133, 64]  # 576 / 9^(1/3) = 276.9, 576 / 9^(2/3) = 133.1


def test_the_schedule_scales_with_depth_and_merges_stages_that_meet():
    assert PyramidDropConfig().schedule(4) == ((1, 2, 3), (1, 2, 3))
    assert PyramidDropConfig().schedule(40) == ((10, 20, 30), (1, 2, 3))
    assert PyramidDropConfig().schedule(2) == ((1,), (3,))  # one drop, straight to the budget
    assert stage_counts(64, 8, (3,)) == [8]
    assert PyramidDropConfig(layers=(1, 3)).schedule(4) == ((1, 3), (1, 2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers=(0, 2)), "start at 1"),
    (dict(layers=(2, 2)), "strictly increasing"),
    (dict(layers=()), "non-empty"),
    (dict(layers=(1.5,)), "tuple of ints"),
    (dict(keep=0.0), "keep"),
    (dict(backend="cuda"), "backend"),
])
def test_config_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PyramidDropConfig(**kwargs)


def test_layers_beyond_the_decoder_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        vtoken.patch(tiny_llava(), "pyramiddrop", layers=(2, 4))


def plain_pyramiddrop(model, inputs, layers, counts):
    """The release's loop for one sample, written out: before (0-based) layer l of ``layers``, rank the visual tokens
    still alive by the head-averaged attention the last prompt token pays them in layer l (its own projections on
    its input, softmax over every key), keep the best ``counts`` in order. Original positions are kept (vtoken's
    rule; the release renumbers them)."""
    lm = model.model.language_model
    hidden, rope = plain_decoder.decoder_input(model, inputs)
    visual_input = inputs["input_ids"][0] == IMAGE_TOKEN
    alive = torch.arange(hidden.shape[1])
    kept = []
    for i, layer in enumerate(lm.layers):
        if i in layers:
            visual = visual_input[alive]
            received = plain_decoder.attention(layer, hidden, alive, rope)[-1][visual]
            top = received.argsort(descending=True, stable=True)[: counts[layers.index(i)]]
            keep = ~visual
            keep[visual.nonzero().squeeze(1)[top]] = True
            hidden, alive = hidden[:, keep], alive[keep]
            kept.append(alive[visual_input[alive]].tolist())
        hidden = plain_decoder.run_layer(layer, hidden, alive, rope)
    return kept, plain_decoder.last_logits(model, hidden)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("config", [dict(keep=0.125), dict(keep=10, layers=(1, 3)), dict(keep=5, layers=(2,))])
def test_pyramiddrop_equals_the_plain_loop(config, attn):
    model, inputs = plain_decoder.one_image_prompt(attn)
    cfg = PyramidDropConfig(**config)
    layers, stages = cfg.schedule(4)
    final = cfg.keep if isinstance(cfg.keep, int) else round(cfg.keep * 64)
    counts = stage_counts(64, final, stages)
    kept, expected = plain_pyramiddrop(model, inputs, layers, counts)
    with vtoken.patch(model, "pyramiddrop", **config) as handle, torch.no_grad():
        out = model(**inputs).logits[:, -1]
        stats = handle.stats
    assert [stats.visual_alive[p][0] for p in layers] == kept
    assert [stats.visual_tokens_per_layer[p][0] for p in layers] == counts  # gone before layer p runs
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

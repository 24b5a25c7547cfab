"""DART: the selection rule by hand, its errors, and the whole method against a plain loop of the release's
algorithm (with vtoken's documented choices). The invariants run from the tables in test_llava_invariants.py and
test_qwen_vl.py."""

from __future__ import annotations

import plain_decoder
import pytest
import torch
import torch.nn.functional as F
from tiny_models import IMAGE_TOKEN, tiny_llava

import vtoken
from vtoken.methods.dart import DARTConfig, dart_select, shares


def test_shares_split_the_budget_exactly_with_the_remainder_first():
    got = shares(torch.tensor([10, 7, 0]), torch.tensor([4, 3, 0]), 5)
    assert got.tolist() == [[3, 3, 2, 2, 0], [3, 2, 2, 0, 0], [0, 0, 0, 0, 0]]


def test_selection_by_hand():
    # 6 visual rows (0-5) and 2 instruction rows (6, 7); features on a circle so similarities are easy to read
    angles = torch.tensor([0.0, 0.1, 1.5, 3.1, 1.6, 0.05, 0.0, 3.0])
    hidden = torch.stack([angles.cos(), angles.sin()], -1).unsqueeze(0)
    scores = torch.tensor([[9.0, 1, 2, 3, 4, 5, 1, 7]])  # pivots: visual row 0, text row 7
    visual = torch.tensor([[True] * 6 + [False] * 2])
    text = ~visual
    kept = dart_select(hidden, scores, visual, text, [3], image_pivots=1, text_pivots=1)
    # the image pivot (row 0) is kept; 2 more split 1 + 1: pivot row 0 (angle 0) takes the least similar visual
    # candidate, row 3 (angle 3.1); then pivot row 7 (angle 3.0) takes the least similar left, row 5 (angle 0.05)
    assert kept[0].nonzero().squeeze(1).tolist() == [0, 3, 5]


def test_a_budget_of_every_token_keeps_every_token_and_a_text_only_row_keeps_none():
    hidden = torch.randn(2, 6, 4)
    visual = torch.tensor([[True] * 4 + [False] * 2, [False] * 6])
    kept = dart_select(hidden, torch.rand(2, 6), visual, ~visual, [4, 0], image_pivots=4, text_pivots=4)
    assert kept.tolist() == visual.tolist()


@pytest.mark.parametrize("kwargs, match", [
    (dict(layer=0), "layer"),
    (dict(image_pivots=0), "image_pivots"),
    (dict(text_pivots=-1), "text_pivots"),
    (dict(keep=1.5), "keep"),
    (dict(backend="x"), "backend"),
])
def test_config_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DARTConfig(**kwargs)


def test_a_layer_beyond_the_decoder_is_refused():
    with pytest.raises(ValueError, match="layer"):
        vtoken.patch(tiny_llava(), "dart", layer=4)


def plain_dart(model, inputs, layer_k, budget, image_pivots, text_pivots):
    """DART for one sample, written out with Python sets: pivots by the L1 norm of layer K-1's keys (before RoPE),
    taking their turns in position order; each takes its share of the budget among the remaining candidates, least
    cosine-similar first (on the decoder's final norm of layer K's input); the rest are dropped before layer K."""
    lm = model.model.language_model
    hidden, rope = plain_decoder.decoder_input(model, inputs)
    visual = inputs["input_ids"][0] == IMAGE_TOKEN
    alive = torch.arange(hidden.shape[1])
    kept = None
    for i, layer in enumerate(lm.layers):
        if i == layer_k - 1:
            with torch.no_grad():
                score = plain_decoder.keys(layer, hidden)[0].abs().sum(dim=(0, 2))
        if i == layer_k:
            with torch.no_grad():
                features = F.normalize(lm.norm(hidden)[0].float(), dim=-1)
            rows = visual.nonzero().squeeze(1).tolist()
            after = [r for r in range(int(visual.nonzero().max()) + 1, hidden.shape[1])]
            img = sorted(rows, key=lambda r: (-float(score[r]), r))[:image_pivots]
            txt = sorted(after, key=lambda r: (-float(score[r]), r))[:text_pivots]
            pivots = sorted(img + txt)
            chosen, pool = set(img), [r for r in rows if r not in img]
            left = budget - len(img)
            for j, p in enumerate(pivots):
                take = left // len(pivots) + (j < left % len(pivots))
                order = sorted(pool, key=lambda r: (float(features[r] @ features[p]), r))[:take]
                chosen |= set(order)
                pool = [r for r in pool if r not in chosen]
            keep = ~visual.clone()
            keep[sorted(chosen)] = True
            hidden, alive = hidden[:, keep], alive[keep]
            kept = sorted(chosen)
        hidden = plain_decoder.run_layer(layer, hidden, alive, rope)
    return kept, plain_decoder.last_logits(model, hidden)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("config", [dict(keep=14), dict(keep=9, layer=1, text_pivots=2), dict(keep=20, layer=3)])
def test_dart_equals_the_plain_loop(config, attn):
    model, inputs = plain_decoder.one_image_prompt(attn)
    cfg = DARTConfig(**config)
    kept, expected = plain_dart(model, inputs, cfg.layer, cfg.keep, cfg.image_pivots, cfg.text_pivots)
    with vtoken.patch(model, "dart", **config) as handle, torch.no_grad():
        out = model(**inputs).logits[:, -1]
        stats = handle.stats
    assert stats.visual_alive[cfg.layer][0] == kept and len(kept) == cfg.keep
    assert stats.visual_tokens_per_layer[cfg.layer][0] == cfg.keep  # gone before layer K runs
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

"""TransPrune: TTV and IGA against hand-computed values, the release's schedule, and the whole method against a plain
re-implementation of the release's loop (one sample, kept tokens keep their original RoPE positions)."""

from __future__ import annotations

import math

import plain_decoder
import pytest
import torch
from tiny_models import IMAGE_TOKEN, tiny_llava

import vtoken
from vtoken.methods.base import LayerContext, instruction_rows
from vtoken.methods.todre import mean_over
from vtoken.methods.transprune import (
    TransPruneConfig,
    release_schedule,
    stage_count,
    sum_normalised,
    token_transition_variation,
)


# -- TTV -----------------------------------------------------------------------------------------------------------
def test_ttv_by_hand():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0]]])
    y = torch.tensor([[[2.0, 0.0], [0.0, -1.0], [1.0, 0.0], [1.0, 0.0]]])
    valid = torch.tensor([[True, True, True, False]])  # the last row is padding
    ratio = [2.0, 1.0, 1 / math.sqrt(2)]
    cos = [1.0, -1.0, 1 / math.sqrt(2)]
    for direction, change in (("release", [1 - c for c in cos]), ("paper", [1 - abs(c) for c in cos])):
        total = sum(math.exp(c) for c in change)
        expected = [r * math.exp(c) / total for r, c in zip(ratio, change)] + [0.0]
        got = token_transition_variation(x, y, valid, direction)
        torch.testing.assert_close(got, torch.tensor([expected]), atol=1e-6, rtol=1e-6)
    # release: a flipped token (cos = -1) changes most; paper: it does not change direction at all
    assert token_transition_variation(x, y, valid, "release")[0].argmax() == 1
    assert token_transition_variation(x, y, valid, "paper")[0, 1] < token_transition_variation(x, y, valid,
                                                                                              "paper")[0, 0]


def test_sum_normalised_by_hand():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    members = torch.tensor([[False, True, True, False]])
    torch.testing.assert_close(sum_normalised(scores, members), torch.tensor([[0.0, 0.4, 0.6, 0.0]]), atol=1e-6,
                               rtol=0)


# -- IGA -----------------------------------------------------------------------------------------------------------
def context_with(probs: torch.Tensor, valid, visual) -> LayerContext:
    """A LayerContext whose attention is the given (B, H, L, L) probabilities."""

    def received(rows, weights):
        picked = probs.mean(1).gather(1, rows.unsqueeze(-1).expand(-1, -1, probs.shape[-1]))  # (B, R, L)
        return torch.einsum("br,brk->bk", weights, picked)

    return LayerContext(layer=1, num_layers=4, hidden=torch.zeros(*valid.shape, 2), valid=valid, visual=visual,
                        n_visual_input=visual.sum(1), attention=None, received=received)


def test_instruction_rows_are_the_real_text_after_the_image():
    valid = torch.tensor([[False, True, True, True, True, True, True]])  # left padding first
    visual = torch.tensor([[False, False, True, True, False, False, False]])
    ctx = context_with(torch.zeros(1, 1, 7, 7), valid, visual)
    assert instruction_rows(ctx).tolist() == [[False, False, False, False, True, True, True]]


def test_iga_by_hand():
    """Two heads over [BOS, v1, v2, v3, q1, q2]: IGA = mean over heads, then over the rows q1, q2, of the attention
    each visual key gets, sum-normalised over the visual tokens; TTV-free (every TTV zero)."""
    L = 6
    head0 = torch.zeros(L, L)
    head1 = torch.zeros(L, L)
    head0[4, :5] = torch.tensor([0.2, 0.5, 0.1, 0.0, 0.2])
    head1[4, :5] = torch.tensor([0.4, 0.1, 0.1, 0.2, 0.2])
    head0[5] = torch.tensor([0.1, 0.1, 0.3, 0.3, 0.1, 0.1])
    head1[5] = torch.tensor([0.5, 0.0, 0.1, 0.1, 0.1, 0.2])
    probs = torch.stack([head0, head1])[None]
    valid = torch.ones(1, L, dtype=torch.bool)
    visual = torch.tensor([[False, True, True, True, False, False]])
    ctx = context_with(probs, valid, visual)
    ctx.positions = torch.arange(L)[None]
    ctx.state["ttv"] = torch.zeros(1, L)
    # by hand: head means of row q1 on v1..v3 = 0.3, 0.1, 0.1; of row q2 = 0.05, 0.2, 0.2;
    # row mean = 0.175, 0.15, 0.15; normalised by 0.475
    iga = torch.tensor([0.175, 0.15, 0.15]) / 0.475
    cfg = TransPruneConfig(keep=2, layers=(1,))
    keep = cfg.prune(ctx)
    assert keep.tolist() == [[True, True, True, False, True, True]]  # v2 and v3 tie: the earlier one stays
    assert ctx.record["kept"] == [2]
    scores = sum_normalised(ctx.received(*mean_over(instruction_rows(ctx))), visual)
    torch.testing.assert_close(scores[0, 1:4], iga, atol=1e-6, rtol=1e-6)


# -- schedule ------------------------------------------------------------------------------------------------------
def test_release_schedule_and_counts():
    assert release_schedule(32) == ((7, 9, 12), (1 / 7, 3 / 7, 1.0))
    assert [stage_count(576, 72, s) for s in (1 / 7, 3 / 7, 1.0)] == [504, 360, 72]  # the release's 576/504/360/72
    assert release_schedule(40)[0] == (9, 11, 15)
    assert release_schedule(8) == ((2, 3), (3 / 7, 1.0))  # 1.75 and 2.25 both round to 2: one stage to 360/576
    assert release_schedule(4) == ((1, 2), (3 / 7, 1.0))
    assert release_schedule(2) == ((1,), (1.0,))
    cfg = TransPruneConfig()
    assert cfg.score_layers(32) == (7, 9, 12)
    assert cfg.observed_sublayers(32) == {"attention": tuple(range(6, 12)), "mlp": tuple(range(6, 12))}
    assert TransPruneConfig(layers=(2, 5)).schedule(8) == ((2, 5), (0.5, 1.0))
    assert TransPruneConfig(shares=(0.2, 0.5, 1.0)).schedule(32) == ((7, 9, 12), (0.2, 0.5, 1.0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers=(3, 2)), "strictly increasing"),
    (dict(layers=(0, 2)), "must be >= 1"),
    (dict(layers=[]), "non-empty tuple"),
    (dict(shares=(0.5, 1.0)), "one entry per pruning layer"),
    (dict(shares=(0.2, 0.5, 0.9)), "end at 1.0"),
    (dict(layers=(2, 4), shares=(0.5, 0.4)), "strictly increasing"),
    (dict(direction="abs"), "direction='abs' is not allowed"),
    (dict(iga="yes"), "iga='yes' is not allowed"),
    (dict(keep=0), "keep=0 is out of range"),
])
def test_config_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransPruneConfig(**kwargs)


def test_layers_beyond_the_decoder_are_refused():
    with pytest.raises(ValueError, match=r"layers=\(2, 4\) is out of range for a 4-layer decoder; allowed: 1 ... 3"):
        vtoken.patch(tiny_llava(), "transprune", layers=(2, 4))


# -- the whole method against a plain loop -------------------------------------------------------------------------
def plain_transprune(model, inputs, layers, counts, direction, iga):
    """The release's algorithm for one sample, written out: run the decoder layer by layer, store each accumulation
    layer's TTV as a vector over the current tokens (re-indexed at every prune), and before (0-based) layer p score
    the visual tokens by normalised accumulated TTV + normalised IGA of layer p's own projections (eager
    attention), keep the best ``counts`` in order. Returns the visual positions alive after each stage and the last
    token's logits."""
    lm = model.model.language_model
    hidden, rope = plain_decoder.decoder_input(model, inputs)
    visual_input = inputs["input_ids"][0] == IMAGE_TOKEN
    alive = torch.arange(hidden.shape[1])
    stored, kept = [], []
    accumulate = range(layers[0] - 1, layers[-1])
    io = {}
    for i, layer in enumerate(lm.layers):
        if i in layers:
            visual = visual_input[alive]
            ttv = torch.stack(stored).sum(0)[visual]
            score = ttv / (ttv.sum() + 1e-8)
            if iga:
                probs = plain_decoder.attention(layer, hidden, alive, rope)
                last_visual = int(visual.nonzero().max())
                rows = torch.arange(last_visual + 1, hidden.shape[1])
                g = probs[rows][:, visual].mean(0)
                score = score + g / (g.sum() + 1e-8)
            top = score.argsort(descending=True, stable=True)[: counts[layers.index(i)]]
            keep = ~visual
            keep[visual.nonzero().squeeze(1)[top]] = True
            hidden, alive = hidden[:, keep], alive[keep]
            stored = [t[keep] for t in stored]
            kept.append(alive[visual_input[alive]].tolist())
        io.clear()
        hooks = [layer.self_attn.register_forward_hook(
                     lambda m, a, kw, out: io.update(attn=(kw["hidden_states"], out[0])), with_kwargs=True),
                 layer.mlp.register_forward_hook(lambda m, a, out: io.update(mlp=(a[0], out)))]
        hidden = plain_decoder.run_layer(layer, hidden, alive, rope)
        for h in hooks:
            h.remove()
        if i in accumulate:
            total = 0
            for x, y in io.values():
                x, y = x[0], y[0]
                ratio = y.norm(dim=-1) / x.norm(dim=-1)
                cos_xy = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
                change = 1 - (cos_xy.abs() if direction == "paper" else cos_xy)
                total = total + ratio * change.exp() / change.exp().sum()
            stored.append(total)
    return kept, plain_decoder.last_logits(model, hidden)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("config", [
    dict(keep=8, layers=(1, 3)),  # two stages, the second after three accumulated layers
    dict(keep=0.25),  # the release's schedule scaled to 4 layers: after layers 1 and 2
    dict(keep=8, layers=(2,), iga=False, direction="paper"),
])
def test_transprune_equals_the_plain_loop(config, attn):
    model, inputs = plain_decoder.one_image_prompt(attn)
    cfg = TransPruneConfig(**config)
    layers, shares = cfg.schedule(4)
    counts = [stage_count(64, cfg.keep if isinstance(cfg.keep, int) else round(cfg.keep * 64), s) for s in shares]
    kept, expected = plain_transprune(model, inputs, layers, counts, cfg.direction, cfg.iga)
    with vtoken.patch(model, "transprune", **config) as handle, torch.no_grad():
        out = model(**inputs).logits[:, -1]
        stats = handle.stats
    assert [stats.visual_alive[p][0] for p in layers] == kept
    # the decision at layer p removes the tokens before layer p runs (the release prunes the output of layer p-1)
    assert [stats.visual_tokens_per_layer[p][0] for p in layers] == counts
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

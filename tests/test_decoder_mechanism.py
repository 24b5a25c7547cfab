"""DecoderPruner's general capabilities, with probe methods: what sub-layer observers see, pruning at the scored layer
itself, and zeroing cached K/V after prefill (mapped through the per-layer alive sets)."""

from __future__ import annotations

import copy

import torch
from tiny_models import cache_keyword, left_pad, tiny_llava
from transformers.cache_utils import DynamicCache

from vtoken.adapters.vlm.decoder import DecoderPruner
from vtoken.adapters.vlm.stats import VLMStats
from vtoken.handle import Handle
from vtoken.methods.base import PrefillOutcome, VisualTokenMethod


class EvenPositions(VisualTokenMethod):
    """Keeps the visual tokens at even LLM-input positions, scored at ``layer``; observes ``observed``."""

    method_name = "probe"

    def __init__(self, layer: int, at_scored_layer: bool = False, observed=None, zero=None):
        self.layer, self.observed, self.zero = layer, observed or {}, zero or {}
        self.prune_at_scored_layer = at_scored_layer
        self.seen = []

    def score_layers(self, num_layers):
        return (self.layer,)

    def prune(self, ctx):
        return ~ctx.visual | (ctx.positions % 2 == 0)

    def observed_sublayers(self, num_layers):
        return self.observed

    def observe(self, ctx):
        self.seen.append(ctx)

    def after_prefill(self, state):
        return PrefillOutcome(zero_kv=self.zero)


def batch():
    """Two left-padded rows with visual tokens at columns 3-12 of the longer one."""
    rows = [torch.tensor([1, 5, 6, *range(20, 30), 7, 8, 9]), torch.tensor([1, 5, *range(30, 40), 7])]
    ids, mask = left_pad(rows)
    visual = (ids >= 20) & (ids < 40)
    return ids, mask, visual


def run(lm, method, ids, mask, visual, cache=None):
    handle = Handle(lm, "probe", None, "test")
    pruner = DecoderPruner(lm, method, VLMStats(), handle)
    pruner.begin_prefill(visual, mask.bool())
    try:
        with torch.no_grad():
            out = lm(input_ids=ids, attention_mask=mask, **{cache_keyword(lm): cache}, use_cache=cache is not None)
        return pruner, out
    finally:
        handle.remove()


def test_observers_see_each_sub_layer_of_the_alive_tokens():
    lm = tiny_llava("eager").model.language_model
    ids, mask, visual = batch()
    method = EvenPositions(1, observed={"attention": (0, 2), "mlp": (2,), "mlp_hidden": (2,)})
    captured = {}

    def capture(name):
        def hook(module, args, kwargs, output):
            captured[name] = (args[0] if args else kwargs["hidden_states"], output)

        return hook

    layer0, layer2 = lm.layers[0], lm.layers[2]
    mine = [layer0.register_forward_pre_hook(lambda m, a, kw: captured.update(input0=kw.get("hidden_states",
                                                                                            a[0] if a else None)),
                                             with_kwargs=True),
            layer2.mlp.register_forward_hook(capture("mlp2"), with_kwargs=True)]
    pruner, _ = run(lm, method, ids, mask, visual)
    for hook in mine:
        hook.remove()
    by = {(c.layer, c.kind): c for c in method.seen}
    assert sorted(by) == [(0, "attention"), (2, "attention"), (2, "mlp"), (2, "mlp_hidden")]
    first = by[0, "attention"]  # layer 0: every token, the attention block's normalised input
    torch.testing.assert_close(first.input, layer0.input_layernorm(captured["input0"]))
    assert first.positions.tolist() == [list(range(ids.shape[1]))] * 2
    assert torch.equal(first.valid, mask.bool()) and torch.equal(first.visual, visual)
    mlp, hidden = by[2, "mlp"], by[2, "mlp_hidden"]  # layer 2: after the prune at layer 1
    torch.testing.assert_close(mlp.input, captured["mlp2"][0])
    torch.testing.assert_close(mlp.output, captured["mlp2"][1])
    m = layer2.mlp
    torch.testing.assert_close(hidden.input, m.act_fn(m.gate_proj(mlp.input)) * m.up_proj(mlp.input))
    torch.testing.assert_close(hidden.output, mlp.output)
    alive, live, _ = pruner.state.per_layer[2]
    assert torch.equal(mlp.positions, alive)
    for b in range(2):
        real = mlp.positions[b][mlp.valid[b]].tolist()
        assert real == sorted(set(real)) and all(mask[b, p] for p in real)  # no padding, no filler twice
        kept_visual = [p for p in real if visual[b, p]]
        assert kept_visual and all(p % 2 == 0 for p in kept_visual)
    assert all(c.n_positions == ids.shape[1] for c in method.seen)


def test_pruning_at_the_scored_layer_equals_deciding_one_layer_earlier():
    """The same decision made at layer 2's input with ``prune_at_scored_layer`` and at layer 1's input without it:
    both remove the tokens before layer 2 runs."""
    lm = tiny_llava().model.language_model
    ids, mask, visual = batch()
    at_two, out_at = run(lm, EvenPositions(2, at_scored_layer=True), ids, mask, visual)
    at_one, out_one = run(lm, EvenPositions(1), ids, mask, visual)
    assert at_two.stats.tokens_per_layer == at_one.stats.tokens_per_layer
    assert at_two.stats.tokens_per_layer[1] > at_two.stats.tokens_per_layer[2]
    assert at_two.stats.visual_alive.keys() == at_one.stats.visual_alive.keys() == {2}
    real = mask.sum(1) - (visual & (torch.arange(ids.shape[1]) % 2 == 1)).sum(1)
    for b in range(2):
        n = int(real[b])
        torch.testing.assert_close(out_at.last_hidden_state[b, -n:], out_one.last_hidden_state[b, -n:])


def test_zero_kv_hits_the_slots_that_hold_the_positions():
    lm = tiny_llava().model.language_model
    ids, mask, visual = batch()
    ids, mask, visual = ids[:1], mask[:1], visual[:1]  # columns 3..12 are visual
    zero = torch.zeros_like(visual)
    zero[0, [3, 4, 8]] = True  # the prune at layer 1 keeps the even visual positions: 4 and 8, not 3
    plain, _ = run(lm, EvenPositions(1), ids, mask, visual, cache=DynamicCache(config=lm.config))
    method = EvenPositions(1, zero={0: zero, 2: zero})
    cache = DynamicCache(config=lm.config)
    pruner, _ = run(lm, method, ids, mask, visual, cache=cache)
    before = copy.deepcopy(cache)
    pruner.end_prefill(cache)
    alive = pruner.state.per_layer[2][0][0].tolist()
    assert 3 not in alive
    expected = {0: [3, 4, 8], 1: [], 2: [alive.index(4), alive.index(8)], 3: []}  # layer 2 caches the alive ones
    for i, slots in expected.items():
        keys, values, old = cache.layers[i].keys, cache.layers[i].values, before.layers[i].keys
        hit = torch.zeros(keys.shape[2], dtype=torch.bool)
        hit[slots] = True
        assert not keys[:, :, hit].any() and not values[:, :, hit].any()
        assert torch.equal(keys[:, :, ~hit], old[:, :, ~hit])
    assert plain.stats.tokens_per_layer == pruner.stats.tokens_per_layer

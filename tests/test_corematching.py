"""CoreMatching: core neurons, core-token scores and the elbow threshold against hand-computed values; the selection
against a plain re-derivation from the unpatched model's activations; decode FFN sparsity (sliced weights = the dense
FFN with the other neurons zeroed, per row, carried with each conversation's cache); the released code's K/V zeroing.
The invariants of docs/design.md run from the tables in test_llava_invariants.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_llava_invariants import Host, greedy
from tiny_models import IMAGE_TOKEN, PAD, cache_keyword, left_pad, prompt, tiny_llava
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

import vtoken
from vtoken.adapters import _compat
from vtoken.adapters._compat import find_cache
from vtoken.adapters.vlm.cache import CacheLayout
from vtoken.adapters.vlm.ffn import SlicedFFN
from vtoken.methods.corematching import (
    CoreMatchingConfig,
    core_token_scores,
    elbow_keep,
    elbow_threshold,
    sentence_core_neurons,
    token_core_neurons,
)

GEN = dict(do_sample=False, pad_token_id=PAD, suppress_tokens=[IMAGE_TOKEN])


@pytest.fixture(scope="module")
def host():
    return Host("llava")


# -- the pieces, by hand ----------------------------------------------------------------------------------------------
def test_token_core_neurons_by_hand():
    a = torch.tensor([[3.0, -1.0, 2.0, 5.0, 0.0, 1.0]])  # positives 3, 2, 5, 1
    assert token_core_neurons(a, 0.5).tolist() == [[True, False, False, True, False, False]]  # ceil(2.0): 5, 3
    assert token_core_neurons(a, 0.2).tolist() == [[False, False, False, True, False, False]]  # ceil(0.8) = 1
    assert token_core_neurons(a, 1.0).tolist() == [[True, False, True, True, False, True]]
    assert not token_core_neurons(torch.tensor([[-1.0, 0.0]]), 0.5).any()  # no positive activation, no core
    assert token_core_neurons(torch.tensor([[3.0, 2.0, 2.0, 1.0]]), 0.5).tolist() == [[True, True, True, False]]


def test_sentence_core_neurons_by_hand():
    token_core = torch.tensor([[[1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 0, 0, 1]]], dtype=torch.bool)
    valid = torch.ones(1, 3, dtype=torch.bool)
    # counts 1, 3, 1, 0, 1; beta = 0.4 keeps int(2.0) = 2: neuron 1, then the lowest of the tied 0, 2, 4
    assert sentence_core_neurons(token_core, valid, 0.4).tolist() == [[0, 1]]
    # without the first token (padding): counts 0, 2, 1, 0, 1
    assert sentence_core_neurons(token_core, torch.tensor([[False, True, True]]), 0.4).tolist() == [[1, 2]]
    assert sentence_core_neurons(token_core, valid, 1.0).tolist() == [[0, 1, 2, 3, 4]]
    assert sentence_core_neurons(token_core, valid, 0.01).tolist() == [[1]]  # at least one neuron


def test_core_token_scores_by_hand():
    a = torch.tensor([[[1.0, -1.0, 2.0, 0.0, 3.0], [-1.0, 1.0, 1.0, 1.0, -1.0]]])
    assert core_token_scores(a, torch.tensor([[0, 2]])).tolist() == [[2, 1]]  # {0,2,4} and {1,2,3} against {0,2}


def test_elbow_threshold_by_hand():
    # normalised: x = 0, .25, .5, .75, 1; y = 1, .9, .2, .1, 0; distance to the chord ~ |1 - x - y|: 0, .15, .3, .15, 0
    scores = torch.tensor([1.0, 0.0, 10.0, 2.0, 9.0])
    assert float(elbow_threshold(scores)) == 2.0
    visual = torch.ones(1, 5, dtype=torch.bool)
    assert elbow_keep(scores[None], visual).tolist() == [[False, False, True, True, True]]  # >= 2: the paper
    assert elbow_keep(scores[None], visual, strict=True).tolist() == [[False, False, True, False, True]]  # release
    assert float(elbow_threshold(torch.full((7,), 3.0))) == 3.0  # no knee: every token reaches it
    assert float(elbow_threshold(torch.tensor([4.0]))) == 4.0
    text = torch.tensor([[False, True, True, True, True, True]])
    assert elbow_keep(torch.tensor([[-5.0, 1.0, 0.0, 10.0, 2.0, 9.0]]), text)[0, 0]  # non-visual tokens stay


def exact_elbow(values: list[int]) -> int:
    """The maximum-distance rule in exact integer arithmetic, in plain Python: the first farthest point wins."""
    y = sorted(values, reverse=True)
    n = len(y)
    distance = [abs((n - 1) * (y[0] - yi) + i * (y[-1] - y[0])) for i, yi in enumerate(y)]
    return y[distance.index(max(distance))]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=600))
def test_the_elbow_is_the_first_farthest_point_in_exact_arithmetic(values):
    """Small integer ranges over long vectors make exact ties common; the float normalised rule broke some of them
    the other way (once moving the threshold from 44 to 529 kept tokens)."""
    expected = exact_elbow(values)
    assert int(elbow_threshold(torch.tensor(values))) == expected
    assert float(elbow_threshold(torch.tensor(values, dtype=torch.float64))) == expected


def test_an_exact_tie_goes_to_the_higher_threshold():
    # sorted 9, 5, 2, 0: distances |3 (9 - y_i) - 9 i| = 0, 3, 3, 0; points 1 and 2 tie, the first (score 5) wins
    assert int(elbow_threshold(torch.tensor([2, 9, 0, 5]))) == 5
    assert elbow_keep(torch.tensor([[2, 9, 0, 5]]), torch.ones(1, 4, dtype=torch.bool)).tolist() == [
        [False, True, False, True]]


# -- FFN slicing ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3])
def test_sliced_ffn_equals_the_dense_ffn_with_other_neurons_zeroed(rows, bias):
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=24, intermediate_size=40, num_attention_heads=4, mlp_bias=bias))
    neurons = torch.stack([torch.randperm(40)[:15].sort().values for _ in range(rows)])  # one set per row
    x = torch.randn(rows, 1, 24)
    keep = torch.zeros(rows, 40).scatter_(1, neurons, 1.0)
    expected = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) * keep.unsqueeze(1))
    sliced = SlicedFFN(_compat.GatedMLP(mlp, mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn), neurons)
    torch.testing.assert_close(sliced(x), expected, atol=1e-6, rtol=1e-5)
    every = torch.arange(40).expand(rows, -1)
    torch.testing.assert_close(SlicedFFN(_compat.gated_mlp(_Layer(mlp)), every)(x), mlp(x), atol=1e-6, rtol=1e-5)


def test_sliced_ffn_copies_the_union_of_the_rows_sets_once():
    mlp = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=12, num_attention_heads=2))
    parts = _compat.gated_mlp(_Layer(mlp))
    same = SlicedFFN(parts, torch.tensor([[1, 4, 7], [1, 4, 7]]))  # beams of one prompt
    assert same.gate_up.shape == (6, 8) and same.down.shape == (8, 3) and same.mask is None
    mixed = SlicedFFN(parts, torch.tensor([[1, 4, 7], [0, 4, 9]]))
    assert mixed.gate_up.shape == (10, 8) and mixed.mask.squeeze(1).tolist() == [[0, 1, 1, 1, 0], [1, 0, 1, 0, 1]]
    assert mixed.gate_up.is_contiguous() and mixed.down.is_contiguous()


class _Layer:
    def __init__(self, mlp):
        self.mlp = mlp


# -- the selection against the unpatched model ------------------------------------------------------------------------
def plain_core_tokens(activation: torch.Tensor, visual: torch.Tensor, rho: float, beta: float) -> list[int]:
    """The paper's rule written out token by token for one sample: (L, m) activations -> kept visual positions."""
    L, m = activation.shape
    frequency = [0] * m
    for row in activation.tolist():
        positive = sorted((v for v in row if v > 0), reverse=True)
        if positive:
            cut = positive[math.ceil(rho * len(positive)) - 1]
            for n, v in enumerate(row):
                frequency[n] += v > 0 and v >= cut
    core = set(sorted(range(m), key=lambda n: (-frequency[n], n))[: max(1, int(beta * m))])
    scores = {p: sum(1 for n in core if activation[p, n] > 0) for p in visual.nonzero().squeeze(1).tolist()}
    tau = exact_elbow(list(scores.values()))
    return [p for p, s in scores.items() if s >= tau]


def down_proj_inputs(model, layers: list[int]) -> dict[int, torch.Tensor]:
    """The hidden activations (down_proj inputs) of the first multi-token call, per layer."""
    seen = {}

    def grab(i):
        def hook(module, args):
            if args[0].shape[1] > 1:
                seen.setdefault(i, args[0][0].clone())

        return hook

    mlps = model.model.language_model.layers
    return seen, [mlps[i].mlp.down_proj.register_forward_pre_hook(grab(i)) for i in layers]


@pytest.mark.parametrize("layer", [1, 2])
def test_core_tokens_equal_the_plain_rule_on_the_unpatched_activations(host, layer):
    inputs = host.single(0)
    seen, hooks = down_proj_inputs(host.model, [layer - 1])
    with torch.no_grad():
        dense = host.model(**inputs).logits
    for h in hooks:
        h.remove()
    expected = plain_core_tokens(seen[layer - 1], inputs["input_ids"][0] == IMAGE_TOKEN, 0.2, 0.4)
    with vtoken.patch(host.model, "corematching", layer=layer) as handle, torch.no_grad():
        out = host.model(**inputs).logits
        assert handle.stats.visual_alive[layer][0] == expected
        assert handle.stats.visual_tokens_per_layer[layer][0] == len(expected) < host.counts[0]
        assert handle.stats.records[layer]["kept"] == [len(expected)]
    assert out.shape[1] == dense.shape[1] - (host.counts[0] - len(expected))


def test_decode_neurons_are_each_rows_sentence_core_neurons(host):
    """The neurons every row's decode steps run are that row's core neurons at each converted layer, computed on the
    tokens alive there; a left-padded batch gives each row what it gets alone."""
    model = host.model
    cfg = CoreMatchingConfig()
    layers = cfg.decode_ffn_layers(4)
    assert layers == (1, 2)  # CoreInfer's 6-26 of 32, scaled to 4 layers
    with vtoken.patch(model, "corematching") as handle, torch.no_grad():
        singles = []
        for i in range(3):
            seen, hooks = down_proj_inputs(model, list(layers))
            out = model.generate(**host.single(i), max_new_tokens=2, return_dict_in_generate=True, **GEN)
            for h in hooks:
                h.remove()
            neurons = CacheLayout.of(find_cache(out)).row_state["decode_neurons"]
            assert neurons.shape == (1, 2, int(0.4 * 128))
            for j, layer in enumerate(layers):
                valid = torch.ones(1, seen[layer].shape[0], dtype=torch.bool)
                expected = sentence_core_neurons(token_core_neurons(seen[layer][None], 0.2), valid, 0.4)
                assert torch.equal(neurons[:, j], expected)
            singles.append(neurons)
        out = model.generate(**host.batch(), max_new_tokens=2, return_dict_in_generate=True, **GEN)
        assert torch.equal(CacheLayout.of(find_cache(out)).row_state["decode_neurons"], torch.cat(singles))
        assert handle.stats.visual_tokens_per_layer[-1] == [
            len(x) for x in handle.stats.visual_alive[cfg.layer]]


def test_decode_sparsity_changes_decoding_but_not_the_first_token(host):
    """The invariant tests compare sparse decoding with a reference; here: it is not the dense decode."""
    model, inputs = host.model, host.batch()
    with vtoken.patch(model, "corematching", ffn_layers="none"), torch.no_grad():
        dense_decode = greedy(model, n=8, **inputs)
    with vtoken.patch(model, "corematching", ffn_layers="all"), torch.no_grad():
        sparse = greedy(model, n=8, **inputs)
    assert torch.equal(sparse[:, 0], dense_decode[:, 0])  # the first token comes from the (dense-FFN) prefill
    assert not torch.equal(sparse, dense_decode)


def test_each_conversation_keeps_its_own_decode_neurons(host):
    """A's follow-up after B's prefill equals A's follow-up with nothing in between: the neurons ride on each
    cache, and the sliced weights are remade when a different conversation continues."""
    model = host.model

    def first_turn(i):
        inputs = host.single(i)
        out = model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True, **GEN)
        return out.sequences, find_cache(out)

    def follow_up(ids, cache):
        ids = torch.cat([ids, torch.tensor([[11, 12, 13]])], 1)
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{cache_keyword(model): cache},
                              max_new_tokens=4, **GEN)[:, -4:]

    with vtoken.patch(model, "corematching"), torch.no_grad():
        ids_a, cache_a = first_turn(0)
        alone = follow_up(ids_a, copy.deepcopy(cache_a))
        _, cache_b = first_turn(1)
        neurons = [CacheLayout.of(c).row_state["decode_neurons"] for c in (cache_a, cache_b)]
        assert not torch.equal(*neurons)
        assert torch.equal(follow_up(ids_a, cache_a), alone)


def test_a_cache_continues_only_with_the_layers_its_neurons_were_chosen_for(host):
    model = host.model
    with torch.no_grad():
        with vtoken.patch(model, "corematching"):
            out = model.generate(**host.single(0), max_new_tokens=2, return_dict_in_generate=True, **GEN)
        ids = torch.cat([out.sequences, torch.tensor([[11, 12, 13]])], 1)
        with vtoken.patch(model, "corematching", ffn_layers="all"), pytest.raises(
                ValueError, match=r"decode neurons were chosen for layers \[1, 2\], but corematching now converts"):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           **{cache_keyword(model): find_cache(out)}, max_new_tokens=2, **GEN)


# -- the released code -------------------------------------------------------------------------------------------------
def test_release_variant_zeroes_the_kv_the_release_rule_picks():
    model = tiny_llava(layers=20)
    torch.manual_seed(2)
    ids = prompt(64, after=(7, 8, 9, 10, 11, 12)).unsqueeze(0)
    inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 112, 112), attention_mask=torch.ones_like(ids))
    layers = list(range(5, 19))
    assert CoreMatchingConfig(variant="release").observed_sublayers(20) == {"mlp_hidden": tuple(layers)}
    seen, hooks = down_proj_inputs(model, layers)
    with torch.no_grad():
        dense = model.generate(**inputs, max_new_tokens=4, return_dict_in_generate=True, output_logits=True, **GEN)
    for h in hooks:
        h.remove()
    visual = (ids[0] == IMAGE_TOKEN).nonzero().squeeze(1).tolist()
    with vtoken.patch(model, "corematching", variant="release") as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, return_dict_in_generate=True, output_logits=True, **GEN)
        assert handle.stats.visual_tokens_per_layer == [[64]] * 20  # nothing removed
    torch.testing.assert_close(out.logits[0], dense.logits[0], atol=0, rtol=0)  # the first token is the dense one
    zeroed = 0
    for i, (dense_layer, layer) in enumerate(zip(dense.past_key_values.layers, find_cache(out).layers)):
        cut = torch.zeros(ids.shape[1], dtype=torch.bool)
        if i in layers:
            active = seen[i] > 0
            shared = (active & active[ids.shape[1] - 5]).sum(-1)  # the fifth-last prompt token
            tau = exact_elbow([int(shared[p]) for p in visual])
            cut[[p for p in visual if shared[p] <= tau]] = True
        zeroed += int(cut.sum())
        n = ids.shape[1]
        assert torch.equal(layer.keys[:, :, :n][:, :, cut], torch.zeros_like(layer.keys[:, :, :n][:, :, cut]))
        assert torch.equal(layer.values[:, :, :n][:, :, cut], torch.zeros_like(layer.values[:, :, :n][:, :, cut]))
        # the prefill's other entries are the dense model's
        torch.testing.assert_close(layer.keys[:, :, :n][:, :, ~cut], dense_layer.keys[:, :, :n][:, :, ~cut])
    assert zeroed > 0


# -- configuration -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(rho=0.0), "rho=0.0 is out of range"),
    (dict(beta=1.5), "beta=1.5 is out of range"),
    (dict(layer=0), "layer=0 is out of range"),
    (dict(keep=0), "keep=0 is out of range"),
    (dict(ffn_layers="3-1"), "ffn_layers='3-1' is not allowed"),
    (dict(ffn_layers=(1, 1)), r"ffn_layers=\(1, 1\) is not allowed"),
    (dict(ffn_layers="some"), "ffn_layers='some' is not allowed"),
    (dict(variant="sim"), "variant='sim' is not allowed"),
    (dict(variant="release", keep=0.5), "variant='release' reproduces the released code, which has no keep"),
    (dict(variant="release", beta=0.2, ffn_layers="all"), "which has no beta, ffn_layers"),
])
def test_config_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoreMatchingConfig(**kwargs)


def test_ffn_layers_forms():
    assert CoreMatchingConfig(ffn_layers="2-4").decode_ffn_layers(8) == (2, 3, 4)
    assert CoreMatchingConfig(ffn_layers=[5, 1]).decode_ffn_layers(8) == (1, 5)
    assert CoreMatchingConfig(ffn_layers="all").decode_ffn_layers(8) == tuple(range(8))
    assert CoreMatchingConfig(ffn_layers=None).decode_ffn_layers(8) == ()
    assert CoreMatchingConfig(ffn_layers="none").decode_ffn_layers(8) == ()
    assert CoreMatchingConfig().decode_ffn_layers(32) == tuple(range(6, 27))  # CoreInfer's
    assert CoreMatchingConfig().decode_ffn_layers(8) == (2, 3, 4, 5, 6)
    assert CoreMatchingConfig(beta=1.0).decode_ffn_layers(8) == ()  # every neuron: nothing to slice
    with pytest.raises(ValueError, match=r"ffn_layers=\(2, 3, 4\) is out of range for a 4-layer decoder"):
        vtoken.patch(tiny_llava(), "corematching", ffn_layers="2-4")
    with pytest.raises(ValueError, match=r"layer=4 is out of range; allowed: \[1, 3\]"):
        vtoken.patch(tiny_llava(), "corematching", layer=4)


def test_left_padded_batch_neurons_ignore_padding():
    """Padding rows never count toward a row's core neurons: the neurons of a padded row equal its own run's."""
    model = tiny_llava()
    torch.manual_seed(5)
    rows = [prompt(64, after=(7, 8, 9, 10, 11, 12, 13)), prompt(64)]
    ids, mask = left_pad(rows)
    pixels = torch.randn(2, 3, 112, 112)
    with vtoken.patch(model, "corematching"), torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=1,
                               return_dict_in_generate=True, **GEN)
        single = model.generate(input_ids=rows[1][None], attention_mask=torch.ones(1, len(rows[1]), dtype=torch.long),
                                pixel_values=pixels[1:], max_new_tokens=1, return_dict_in_generate=True, **GEN)
    neurons = [CacheLayout.of(find_cache(o)).row_state["decode_neurons"] for o in (batch, single)]
    assert torch.equal(neurons[0][1:], neurons[1])


@pytest.mark.parametrize("config", [dict(keep=0.3), dict(keep=0.3, ffn_layers="all"), dict()])
def test_a_batch_with_a_text_only_row_decodes_each_row_as_alone(config):
    """[image then text, image at the very end, text only], left-padded: every row's greedy tokens are its own; the
    text-only row has no image, so it is neither pruned nor sparse in decode, exactly as alone."""
    torch.manual_seed(3)
    model = tiny_llava(layers=6)
    rows = [prompt(64), prompt(64, after=()), torch.tensor([1, 5, 6, 7, 8, 9, 10, 11])]
    pixels = [torch.randn(1, 3, 112, 112), torch.randn(1, 3, 112, 112), None]
    gen = dict(GEN, max_new_tokens=6)
    with vtoken.patch(model, "corematching", **config), torch.no_grad():
        ids, mask = left_pad(rows)
        batch = model.generate(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pixels[:2]), **gen)
        for i, (row, px) in enumerate(zip(rows, pixels)):
            extra = {} if px is None else dict(pixel_values=px)
            alone = model.generate(input_ids=row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long),
                                   **extra, **gen)
            assert batch[i, ids.shape[1]:].tolist() == alone[0, len(row):].tolist(), f"row {i}"


def test_sliced_ffn_runs_rows_of_minus_one_densely():
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2))
    neurons = torch.stack([torch.arange(0, 32, 3)[:10], torch.full((10,), -1), torch.arange(1, 32, 3)[:10]])
    x = torch.randn(3, 1, 16)
    out = SlicedFFN(_compat.gated_mlp(_Layer(mlp)), neurons)(x)
    torch.testing.assert_close(out[1], mlp(x[1:2])[0], rtol=0, atol=0)
    for row in (0, 2):
        hidden = mlp.act_fn(mlp.gate_proj(x[row])) * mlp.up_proj(x[row])
        keep = torch.zeros(32, dtype=torch.bool)
        keep[neurons[row]] = True
        torch.testing.assert_close(out[row], mlp.down_proj(hidden * keep), rtol=1e-5, atol=1e-6)

"""Paths a production user meets after the main ones: copies of a patched model, static caches, 4-D attention masks
and token clustering composed with an LLM-side method. Each gives the right answer or a clear refusal."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_llava_invariants import PRUNING, Host, method_of
from tiny_models import IMAGE_TOKEN, PAD, cache_keyword, hooks_of, prompt, tiny_llava
from transformers import StaticCache

import vtoken

GEN = dict(max_new_tokens=3, do_sample=False, pad_token_id=PAD, suppress_tokens=[IMAGE_TOKEN])


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def host(request):
    return Host(request.param)


# copy.deepcopy ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["todre", "random", "attn_topk", "corematching"])
def test_deepcopy_of_a_patched_model_is_refused_at_copy_time(name):
    model = tiny_llava()
    handle = vtoken.patch(model, name, **PRUNING[name])
    hooked = [model, model.model] + ([model.model.language_model] if name != "random" else [])
    for target in hooked:
        with pytest.raises(RuntimeError, match=f"deepcopy of a .* patched by vtoken .*{name}.*handle.remove"):
            copy.deepcopy(target)
    handle.remove()
    clone = copy.deepcopy(model)  # unpatched again: copies as usual, and the copy can be patched on its own
    with vtoken.patch(clone, name, **PRUNING[name]):
        copy.deepcopy(model)


def test_the_copy_guard_stays_while_any_method_remains():
    model = tiny_llava(image_size=224, vision_layers=4)
    clustering = vtoken.patch(model, "token_clustering", num_clusters=0.25, reconstruct=False)
    todre = vtoken.patch(model, "todre", keep=0.5)
    clustering.remove()
    with pytest.raises(RuntimeError, match="todre"):
        copy.deepcopy(model)
    todre.remove()
    copy.deepcopy(model)


# static caches -------------------------------------------------------------------------------------------------
IN_LLM = ["todre_stage2_fires", "attn_topk", "transprune", "corematching", "corematching_keep", "pyramiddrop", "dart"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", IN_LLM)
def test_in_llm_pruning_on_a_static_cache_gives_the_eager_dynamic_tokens(host, name, attn):
    """A pruned layer fills fewer of the static cache's slots: its masks (prefill and every decode step) are moved
    onto them at the width generate() builds, and the rest stay forbidden; compiled decode steps alike."""
    from test_compile import assert_static_and_compiled_match

    torch._dynamo.reset()
    model = host.model
    gen = dict(GEN, max_new_tokens=4, return_dict_in_generate=True, output_scores=True)
    model.model.language_model.set_attn_implementation(attn)
    try:
        with vtoken.patch(model, method_of(name), **PRUNING[name]) as handle, torch.no_grad():
            for inputs in (host.single(0), host.batch()):
                eager = model.generate(**inputs, **gen)
                layers = handle.stats.visual_tokens_per_layer
                assert layers[-1] != layers[0], layers  # the LLM did prune
                assert_static_and_compiled_match(model, inputs, eager, gen)
                assert handle.stats.visual_tokens_per_layer == layers
    finally:
        model.model.language_model.set_attn_implementation("sdpa")


FIXED_COUNTS = ["attn_topk", "transprune", "corematching_keep", "pyramiddrop", "dart"]
ADAPTIVE = ["todre_stage2_fires", "corematching"]  # a count that depends on the data: masked inside a graph


def decoder_compiled_whole(model, backend: str = "eager"):
    """The language model's ``forward`` compiled with ``fullgraph`` for a block (the bench's ``compiled``): a graph
    break anywhere in the decoder's call, its prefill pruning included, fails the call."""
    from vtoken.adapters._compat import decoder_of
    from vtoken.evals.bench.llava import compiled

    decoder = decoder_of(model.model)[0]
    return compiled({decoder: torch.compile(type(decoder).forward.__get__(decoder), backend=backend, dynamic=False,
                                            fullgraph=True)})


@pytest.mark.parametrize("name", FIXED_COUNTS + ADAPTIVE)
def test_a_prefill_pruned_inside_the_llm_compiles_with_the_decoder_as_one_graph(host, name):
    """The decoder's prefill, pruning included, is one graph (what CUDA graphs replay): a count the budget fixes is a
    host int, and a count that depends on the data is never read there (the tokens it drops are masked instead of
    removed). Single and padded batches give the eager dynamic tokens, scores and per-layer counts."""
    torch._dynamo.reset()
    model = host.model
    gen = dict(GEN, max_new_tokens=4, return_dict_in_generate=True, output_scores=True)
    with vtoken.patch(model, method_of(name), **PRUNING[name]) as handle, torch.no_grad():
        for inputs in (host.single(0), host.batch()):
            eager = model.generate(**inputs, **gen)
            layers = handle.stats.visual_tokens_per_layer
            assert layers[-1] != layers[0], layers
            with decoder_compiled_whole(model):
                out = model.generate(**inputs, cache_implementation="static", disable_compile=True, **gen)
            assert torch.equal(out.sequences, eager.sequences)
            torch.testing.assert_close(torch.stack(out.scores), torch.stack(eager.scores), atol=1e-4, rtol=1e-4)
            assert handle.stats.visual_tokens_per_layer == layers


@pytest.mark.parametrize("name", FIXED_COUNTS + ADAPTIVE)
def test_a_second_request_reuses_the_whole_compiled_decoder(name):
    """Another image, with the method removed and applied again in between (as a bench's rows do): the prefill's
    host state reaches no guard of the compiled decoder (nor does an adaptive decision that keeps another count),
    and its scoring time is reported as not measured."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_llava(layers=4)
    ids = prompt(64).unsqueeze(0)
    gen = dict(GEN, max_new_tokens=4, cache_implementation="static", disable_compile=True)
    images = torch.randn(2, 1, 3, 112, 112) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1, 1)
    with torch.no_grad(), decoder_compiled_whole(model):
        outs = []
        for image, stance in zip(images, ["default", "fail_on_recompile"]):
            with vtoken.patch(model, method_of(name), **PRUNING[name]) as handle, torch.compiler.set_stance(stance):
                outs.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=image,
                                           **gen))
            assert math.isnan(handle.stats.scoring_time_s)
    with vtoken.patch(model, method_of(name), **PRUNING[name]), torch.no_grad():
        for image, out in zip(images, outs):
            assert torch.equal(out, model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                   pixel_values=image, **dict(gen, cache_implementation="dynamic")))
    assert not torch.equal(outs[0], outs[1])


def test_stage_2_firing_in_one_row_of_a_batch_masks_that_rows_tokens_alone_inside_the_compiled_decoder(host):
    """ToDRE's stage 2 decides per row: with tau between the two lowest rows' ratios it removes one row's visual tokens
    and keeps the others'. Inside the whole compiled decoder neither decision is read; the batch gives the eager dynamic
    tokens and scores, and the same per-layer counts."""
    torch._dynamo.reset()
    model, inputs = host.model, host.batch()
    gen = dict(GEN, max_new_tokens=4, return_dict_in_generate=True, output_scores=True)
    with vtoken.patch(model, "todre", keep=0.25, tau=0.0) as handle, torch.no_grad():
        model.generate(**inputs, **gen)
        (record,) = handle.stats.records.values()
    worst = torch.maximum(torch.as_tensor(record["text_to_visual"]), torch.as_tensor(record["visual_to_text"]))
    low = worst.sort().values[:2]
    assert low[0] < low[1], worst
    with vtoken.patch(model, "todre", keep=0.25, tau=float(low.mean())) as handle, torch.no_grad():  # one row fires
        eager = model.generate(**inputs, **gen)
        (record,) = handle.stats.records.values()
        assert torch.as_tensor(record["removed"]).sum() == 1
        layers = handle.stats.visual_tokens_per_layer
        with decoder_compiled_whole(model):
            out = model.generate(**inputs, cache_implementation="static", disable_compile=True, **gen)
        assert handle.stats.visual_tokens_per_layer == layers
    assert torch.equal(out.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(eager.scores), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["attn_topk", "corematching_keep"])
def test_beam_search_after_in_llm_pruning_on_a_static_cache_gives_the_eager_dynamic_tokens(host, name):
    """generate() repeats each row for its beams before the prefill and reorders the cache's rows at every step:
    the slot maps, made once per row, must follow neither (each beam's pruned layers keep its row's slots)."""
    gen = dict(GEN, max_new_tokens=4, num_beams=2, num_return_sequences=2)
    with vtoken.patch(host.model, method_of(name), **PRUNING[name]) as handle, torch.no_grad():
        inputs = host.batch()
        eager = host.model.generate(**inputs, **gen)
        layers = handle.stats.visual_tokens_per_layer
        assert layers[-1] != layers[0], layers
        static = host.model.generate(**inputs, cache_implementation="static", disable_compile=True, **gen)
    assert torch.equal(static, eager)


@pytest.mark.parametrize("name", ["todre_stage2_fires", "attn_topk", "corematching_keep"])
def test_a_static_decode_step_after_in_llm_pruning_has_no_graph_break_inside_the_decoder(name):
    from test_compile import assert_a_static_step_breaks_only_around_the_base_model

    torch._dynamo.reset()
    model = tiny_llava(layers=4)
    ids = prompt(64).unsqueeze(0)
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=96)  # room for the explained step
    with vtoken.patch(model, method_of(name), **PRUNING[name]) as handle, torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=torch.randn(1, 3, 112, 112), return_dict_in_generate=True,
                             **{cache_keyword(model): cache}, **dict(GEN, max_new_tokens=2))
        layers = handle.stats.visual_tokens_per_layer
        assert layers[-1] != layers[0], layers
        assert_a_static_step_breaks_only_around_the_base_model(model, out, "modeling_llama")


@pytest.mark.parametrize("name", ["random", "attn_topk", "corematching_keep", "corematching"])
def test_a_second_request_reuses_the_compiled_decode_steps(name):
    """Per-step host state (masks made per step, the layout) reaches no guard of the compiled decode step: a second
    request with another image compiles nothing, also when an adaptive decision (CoreMatching's threshold) keeps
    another number of tokens."""
    from test_compile import compiled_generate_config

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_llava(layers=4)
    ids = prompt(64).unsqueeze(0)
    gen = dict(GEN, max_new_tokens=5, cache_implementation="static", compile_config=compiled_generate_config())
    images = torch.randn(2, 1, 3, 112, 112) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1, 1)
    with vtoken.patch(model, method_of(name), **PRUNING[name]) as handle, torch.no_grad():
        first = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=images[0], **gen)
        kept = handle.stats.visual_tokens_per_layer[-1]
        with torch.compiler.set_stance("fail_on_recompile"):
            second = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=images[1], **gen)
        if name == "corematching":
            assert handle.stats.visual_tokens_per_layer[-1] != kept  # the threshold kept another count
    assert not torch.equal(first, second)  # another image: another answer from the same graphs


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision", "internvl"])
def uneven(request):
    """A host whose batch's rows keep different numbers of tokens (images of different sizes or tile counts)."""
    return Host(request.param)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["divprune", "pool", "todre", "attn_topk"])
def test_a_static_cache_whose_rows_kept_different_counts_gives_the_eager_dynamic_tokens(uneven, name, attn):
    """The shorter rows get filler slots; generate() builds each step's mask from the slots' own padding (attn_topk:
    rows of different lengths pruned inside the LLM, whose layers keep filler slots of their own)."""
    from test_compile import assert_static_and_compiled_match

    torch._dynamo.reset()
    model, inputs = uneven.model, uneven.batch()
    config = dict(PRUNING[name], stage2=False) if name == "todre" else PRUNING[name]
    gen = dict(GEN, max_new_tokens=5, return_dict_in_generate=True, output_scores=True)
    model.model.language_model.set_attn_implementation(attn)
    try:
        with vtoken.patch(model, method_of(name), **config) as handle, torch.no_grad():
            eager = model.generate(**inputs, **gen)
            kept = handle.stats.visual_tokens_llm
            assert len(set(kept)) > 1, kept  # the rows did keep different numbers: fillers were needed
            assert_static_and_compiled_match(model, inputs, eager, gen)
    finally:
        model.model.language_model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("name", ["attn_topk", "transprune"])
def test_rows_that_keep_different_counts_compile_with_the_decoder_as_one_graph(uneven, name):
    """Filler slots inside the LLM come from host counts too: the decoder compiled whole gives the eager tokens."""
    torch._dynamo.reset()
    model, inputs = uneven.model, uneven.batch()
    gen = dict(GEN, max_new_tokens=4, return_dict_in_generate=True, output_scores=True)
    with vtoken.patch(model, name, **PRUNING[name]) as handle, torch.no_grad():
        eager = model.generate(**inputs, **gen)
        assert len(set(handle.stats.visual_tokens_llm)) > 1
        with decoder_compiled_whole(model):
            out = model.generate(**inputs, cache_implementation="static", disable_compile=True, **gen)
    assert torch.equal(out.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(eager.scores), atol=1e-4, rtol=1e-4)


def test_beam_search_on_such_a_static_cache_gives_the_eager_dynamic_tokens(uneven):
    """generate() repeats each row for its beams before the prefill, so each beam carries its row's filler slots."""
    model, inputs = uneven.model, uneven.batch()
    gen = dict(GEN, max_new_tokens=4, num_beams=2, num_return_sequences=2)
    with vtoken.patch(model, "divprune", keep=0.25), torch.no_grad():
        eager = model.generate(**inputs, **gen)
        static = model.generate(**inputs, cache_implementation="static", **gen)
    assert torch.equal(static, eager)


def test_such_a_static_cache_continued_outside_generate_is_refused(uneven):
    """Outside generate() the caller's mask addresses columns, which no longer line up with the cache's slots."""
    from vtoken.adapters._compat import find_cache

    model, inputs = uneven.model, uneven.batch()
    with vtoken.patch(model, "divprune", keep=0.25), torch.no_grad():
        out = model.generate(**inputs, cache_implementation="static", return_dict_in_generate=True, **GEN)
        step = dict(input_ids=out.sequences[:, -1:], attention_mask=torch.ones_like(out.sequences),
                    **{cache_keyword(model): find_cache(out)})
        with pytest.raises(ValueError, match="kept different numbers of tokens.*through generate"):
            model(**step)


# 4-D attention masks -------------------------------------------------------------------------------------------
def four_d(mask: torch.Tensor, additive: bool) -> torch.Tensor:
    """The (B, 1, L, L) causal padding mask a caller would build from a 2-D one."""
    L = mask.shape[1]
    allowed = torch.tril(torch.ones(L, L, dtype=torch.bool))[None] & mask.bool()[:, None, :]
    allowed = allowed | torch.eye(L, dtype=torch.bool)[None]  # padding rows see themselves: no empty softmax row
    if not additive:
        return allowed[:, None]
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "float"])
@pytest.mark.parametrize("name", sorted(PRUNING))
def test_a_4d_mask_gives_what_its_2d_mask_gives(host, name, additive):
    model = host.model
    inputs = host.batch()
    with vtoken.patch(model, method_of(name), **PRUNING[name]) as handle, torch.no_grad():
        expected = model(**inputs).logits
        rows = handle.stats.tokens_per_layer[-1]
        got = model(**{**inputs, "attention_mask": four_d(inputs["attention_mask"], additive)}).logits
        assert handle.stats.tokens_per_layer[-1] == rows
    for row, n in enumerate(rows):  # padding and filler columns on the left mean nothing
        torch.testing.assert_close(got[row, -n:], expected[row, -n:], atol=1e-5, rtol=1e-5)


# token_clustering(reconstruct=False) composed with LLM-side methods ---------------------------------------------
def clustered_llava():
    model = tiny_llava(image_size=224, vision_layers=4)
    ids = prompt(256).unsqueeze(0)
    return model, dict(input_ids=ids, pixel_values=torch.randn(1, 3, 224, 224), attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("name", ["todre", "random", "pool", "attn_topk", "transprune", "corematching"])
@pytest.mark.parametrize("order", ["clustering first", "method first"])
def test_clustering_tokens_compose_with_llm_methods(name, order):
    model, inputs = clustered_llava()
    with torch.no_grad():
        reference = model(**inputs).logits
    snapshot = hooks_of(model)  # after transformers' own first-use hooks
    with vtoken.patch(model, "token_clustering", num_clusters=0.25, reconstruct=False) as alone, torch.no_grad():
        clustered = model(**inputs).logits
        cluster_tokens = alone.stats.visual_tokens_llm[0]
    assert cluster_tokens == 64  # a quarter of 16 x 16

    def apply(what):
        if what == "clustering":
            return vtoken.patch(model, "token_clustering", num_clusters=0.25, reconstruct=False)
        return vtoken.patch(model, name, keep=0.5)

    first, second = ("clustering", "method") if order == "clustering first" else ("method", "clustering")
    handles = [apply(first), apply(second)]
    with torch.no_grad():
        both = model(**inputs).logits
        stats = handles[-1].stats
        tokens = model.generate(**inputs, **GEN)
    assert stats is handles[0].stats  # one model, one record of its last call
    assert stats.visual_tokens_in == [cluster_tokens]
    llm_tokens = stats.visual_tokens_per_layer[-1][0]
    assert llm_tokens == 32 if name != "pool" else llm_tokens <= 32
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 3
    assert both.shape[1] < clustered.shape[1] or name == "attn_topk"
    for h in reversed(handles) if order == "clustering first" else handles:  # either removal order
        h.remove()
    assert hooks_of(model) == snapshot
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


def test_clustering_alone_keeps_shortening_the_prompt_after_the_method_is_removed():
    model, inputs = clustered_llava()
    clustering = vtoken.patch(model, "token_clustering", num_clusters=0.25, reconstruct=False)
    with torch.no_grad():
        alone = model(**inputs).logits
    method = vtoken.patch(model, "random", keep=0.5)
    method.remove()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, alone)
    clustering.remove()

"""``torch.compile`` of a patched model computes what the eager patched model computes, never the dense model.

TorchDynamo does not guard on module hooks, and it reads a submodule through ``_modules``, so code compiled for
another instance of the same class (or for this one before it was patched) used to keep running without vtoken's
hooks: a silently dense result. Every hooked module now carries its own ``forward`` while hooked, which Dynamo does
guard (vtoken.handle), and TokenFLEX shadows its projector's ``forward`` rather than the attribute.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import IMAGE_TOKEN, PAD, cache_keyword, left_pad, prompt, tiny_llava

import vtoken

LLAVA_METHODS = {
    "random": dict(keep=16), "pool": dict(keep=16), "divprune": dict(keep=16), "todre": dict(keep=16),
    "attn_topk": dict(keep=0.5, layer=2), "transprune": dict(keep=0.25), "corematching": dict(keep=0.3),
    "tokenflex": dict(num_tokens=16),
}
OTHER_BUDGET = {"random": dict(keep=4), "pool": dict(keep=4), "divprune": dict(keep=4), "todre": dict(keep=4),
                "attn_topk": dict(keep=0.125, layer=2), "transprune": dict(keep=0.125), "corematching": dict(keep=0.1),
                "tokenflex": dict(num_tokens=4)}
GEN = dict(max_new_tokens=3, do_sample=False, pad_token_id=PAD, suppress_tokens=[IMAGE_TOKEN])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def inputs():
    torch.manual_seed(1)
    return dict(input_ids=prompt(64).unsqueeze(0), pixel_values=torch.randn(1, 3, 112, 112))


def last_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits[:, -1]


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", sorted(LLAVA_METHODS))
def test_compiled_patched_model_is_never_silently_dense(name):
    batch = inputs()
    other, model = tiny_llava(layers=3), tiny_llava(layers=3)
    dense = last_logits(model, batch)
    last_logits(torch.compile(other, backend="eager"), batch)  # the class's code, compiled unpatched first

    handle = vtoken.patch(model, name, **LLAVA_METHODS[name])
    eager = last_logits(model, batch)
    assert differs(eager, dense)
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(last_logits(compiled, batch), eager, rtol=0, atol=1e-5)

    handle.remove()  # the same compiled module runs dense again
    torch.testing.assert_close(last_logits(compiled, batch), dense, rtol=0, atol=1e-5)

    with vtoken.patch(model, name, **OTHER_BUDGET[name]):  # another budget: not the first patch's graph
        again = last_logits(model, batch)
        assert differs(again, eager)
        torch.testing.assert_close(last_logits(compiled, batch), again, rtol=0, atol=1e-5)


def test_a_compiled_model_follows_a_change_of_method():
    batch = inputs()
    model = tiny_llava(layers=3)
    compiled = torch.compile(model, backend="eager")
    for name in ("attn_topk", "corematching", "transprune", "random"):
        with vtoken.patch(model, name, **LLAVA_METHODS[name]):
            torch.testing.assert_close(last_logits(compiled, batch), last_logits(model, batch), rtol=0, atol=1e-5)


def test_tokenflex_update_reaches_the_compiled_model():
    batch = inputs()
    model = tiny_llava(layers=3)
    compiled = torch.compile(model, backend="eager")
    with vtoken.patch(model, "tokenflex", num_tokens=16) as handle:
        last_logits(compiled, batch)
        handle.update(num_tokens=4)
        torch.testing.assert_close(last_logits(compiled, batch), last_logits(model, batch), rtol=0, atol=1e-5)
        assert handle.stats.visual_tokens_llm == [4]


def test_fullgraph_compilation_of_the_whole_patched_vlm_fails_saying_why_and_what_to_do():
    """vtoken's bookkeeping around the language model's call runs on the host; under ``fullgraph=True`` Dynamo's error
    carries that reason and the way out (compile the language model, which takes ``fullgraph`` with pruning)."""
    model = tiny_llava(layers=2)
    with vtoken.patch(model, "random", keep=16), torch.no_grad(), pytest.raises(
            torch._dynamo.exc.Unsupported, match=r"vtoken keeps the bookkeeping.*compile the language model itself"):
        torch.compile(model, backend="eager", fullgraph=True)(**inputs())


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("config", [dict(keep=0.3), dict(), dict(keep=0.3, ffn_layers="all"), dict(variant="release")])
def test_corematching_generates_the_same_tokens_compiled(backend, config):
    torch.manual_seed(1)
    model = tiny_llava(layers=8)
    ids, mask = left_pad([prompt(64), prompt(64, before=(1, 5))])
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 112, 112))
    with vtoken.patch(model, "corematching", **config) as handle, torch.no_grad():
        eager = model.generate(**batch, **GEN)
        layers = handle.stats.visual_tokens_per_layer
        compiled = torch.compile(model, backend=backend).generate(**batch, **GEN)
        assert torch.equal(compiled, eager)
        assert handle.stats.visual_tokens_per_layer == layers


# static cache + compile: the fast Hugging Face path, for every boundary method -------------------------------------
BOUNDARY = {"random": dict(keep=16), "pool": dict(keep=16), "divprune": dict(keep=16), "cdpruner": dict(keep=16),
            "todre": dict(keep=16, stage2=False), "tokenflex": dict(num_tokens=16)}


def compiled_generate_config():
    """transformers compiles generate()'s decode steps only on accelerators; this asks for it on any device."""
    from transformers import CompileConfig

    config = CompileConfig(backend="eager")
    config._compile_all_devices = True  # the test's only way to exercise the compiled decode on a CPU
    return config


def assert_static_and_compiled_match(model, inputs: dict, eager, gen: dict) -> None:
    """generate() on a static cache, eager and with a compiled decode, gives ``eager``'s tokens and scores (``gen``
    asks for both: ``return_dict_in_generate`` and ``output_scores``)."""
    static = model.generate(**inputs, cache_implementation="static", **gen)
    compiled = model.generate(**inputs, cache_implementation="static", compile_config=compiled_generate_config(),
                              **gen)
    for out in (static, compiled):
        assert torch.equal(out.sequences, eager.sequences)
        torch.testing.assert_close(torch.stack(out.scores), torch.stack(eager.scores), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 2], ids=["single", "padded"])
@pytest.mark.parametrize("name", sorted(BOUNDARY))
def test_static_cache_and_compiled_decode_give_the_eager_dynamic_tokens(name, rows):
    torch.manual_seed(1)
    model = tiny_llava(layers=3)
    ids, mask = left_pad([prompt(64), prompt(64, before=(1, 5))][:rows])
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(rows, 3, 112, 112))
    gen = dict(GEN, max_new_tokens=4)
    with vtoken.patch(model, name, **BOUNDARY[name]), torch.no_grad():
        eager = model.generate(**batch, **gen)
        static = model.generate(**batch, cache_implementation="static", **gen)
        compiled = model.generate(**batch, cache_implementation="static", compile_config=compiled_generate_config(),
                                  **gen)
        assert torch.equal(static, eager) and torch.equal(compiled, eager)
        model.forward = torch.compile(model.forward, backend="eager")  # the user's own compiled forward
        try:
            assert torch.equal(model.generate(**batch, cache_implementation="static", **gen), eager)
        finally:
            del model.forward


@pytest.mark.parametrize("name", sorted(BOUNDARY))
def test_a_static_decode_step_has_no_graph_break_inside_the_decoder(name):
    torch.manual_seed(1)
    model = tiny_llava(layers=3)
    ids = prompt(64).unsqueeze(0)
    with vtoken.patch(model, name, **BOUNDARY[name]), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=torch.randn(1, 3, 112, 112), cache_implementation="static",
                             return_dict_in_generate=True, **dict(GEN, max_new_tokens=2))
        assert_a_static_step_breaks_only_around_the_base_model(model, out, "modeling_llama")


def assert_a_static_step_breaks_only_around_the_base_model(model, out, decoder_file: str) -> None:
    """One decode step continuing ``out``'s static cache, explained by Dynamo: no graph break inside the decoder (its
    modeling file), at most one before and one after the base model's call (vtoken's host bookkeeping, eager)."""
    from vtoken.adapters._compat import find_cache

    step = dict(input_ids=out.sequences[:, -1:], position_ids=torch.tensor([[out.sequences.shape[1] - 1]]),
                use_cache=True, **{cache_keyword(model): find_cache(out)})
    explanation = torch._dynamo.explain(model)(**step)
    inside = [reason for reason in explanation.break_reasons
              if any(decoder_file in frame.filename for frame in reason.user_stack)]
    assert not inside, [reason.reason for reason in inside]
    assert explanation.graph_break_count <= 2

"""InternVL beyond the LLaVA invariant table (test_llava_invariants.py runs it on a tiny InternVL with images of one,
three and two tiles): every tile reduced on its own, and static caches with compiled decoding."""

from __future__ import annotations

import pytest
import torch
from test_llava_invariants import SUPPRESS, Host, logits

import vtoken

GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, suppress_tokens=SUPPRESS)


@pytest.fixture(scope="module")
def host():
    return Host("internvl")


def test_every_tile_is_reduced_on_its_own(host):
    with vtoken.patch(host.model, "divprune", keep=4) as handle:
        logits(host.model, **host.single(1))  # three tiles of 16 tokens
        assert handle.stats.visual_tokens_in == [16, 16, 16] and handle.stats.visual_tokens_kept == [4, 4, 4]
        assert handle.stats.visual_tokens_llm == [12]


@pytest.mark.parametrize("name", ["random", "pool", "divprune", "cdpruner"])
def test_static_cache_and_compiled_decode_give_the_eager_dynamic_tokens(host, name):
    from test_compile import assert_a_static_step_breaks_only_around_the_base_model, compiled_generate_config

    torch._dynamo.reset()
    inputs = host.single(1)
    with vtoken.patch(host.model, name, keep=0.25) as handle, torch.no_grad():
        eager = host.model.generate(**inputs, **GEN)
        static = host.model.generate(**inputs, cache_implementation="static", **GEN)
        compiled = host.model.generate(**inputs, cache_implementation="static",
                                       compile_config=compiled_generate_config(), **GEN)
        assert torch.equal(static, eager) and torch.equal(compiled, eager)
        assert handle.stats.visual_tokens_llm == [12]  # read back through the static cache's masks
        out = host.model.generate(**inputs, cache_implementation="static", return_dict_in_generate=True,
                                  **dict(GEN, max_new_tokens=2))
        assert_a_static_step_breaks_only_around_the_base_model(host.model, out, "modeling_qwen2")

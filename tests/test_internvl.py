"""InternVL beyond the LLaVA invariant table (test_llava_invariants.py runs it on a tiny InternVL with images of one,
three and two tiles): an image's tiles reduced together, found from the prompt's runs of placeholders, and static
caches with compiled decoding."""

from __future__ import annotations

import pytest
import torch
from test_llava_invariants import SUPPRESS, Host, logits
from tiny_models import IMAGE_TOKEN, prompt

import vtoken
from vtoken.evals.bench.overhead import OpCounter
from vtoken.methods.base import GridSegment, ImageContext
from vtoken.methods.divprune import DivPruneConfig

GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, suppress_tokens=SUPPRESS)


@pytest.fixture(scope="module")
def host():
    return Host("internvl")


def test_an_images_tiles_share_one_budget(host):
    with vtoken.patch(host.model, "divprune", keep=4) as handle:
        logits(host.model, **host.single(1))  # one image of three tiles of 16 tokens
        assert handle.stats.visual_tokens_in == [48] and handle.stats.visual_tokens_kept == [4]
        assert handle.stats.visual_tokens_llm == [4]
        logits(host.model, **host.batch())  # rows of one image each: one, three and two tiles
        assert handle.stats.visual_tokens_in == [16, 48, 32] and handle.stats.visual_tokens_kept == [4, 4, 4]
        assert handle.stats.visual_tokens_llm == [4, 4, 4]


def test_the_prompts_runs_of_placeholders_say_which_tiles_form_an_image(host):
    # three views: an image of one tile, then one of two tiles, separated by text
    ids = torch.cat([prompt(16, after=(7,)), torch.full((32,), IMAGE_TOKEN), torch.tensor([8, 9])]).unsqueeze(0)
    pixels = torch.randn(3, 3, 112, 112)
    with vtoken.patch(host.model, "divprune", keep=4) as handle:
        logits(host.model, input_ids=ids, pixel_values=pixels)
        assert handle.stats.visual_tokens_in == [16, 32] and handle.stats.visual_tokens_kept == [4, 4]


def test_tiles_are_ranked_together(host):
    """The patched model equals the unpatched one fed DivPrune's choice among all of the image's tiles at once."""
    model, inputs = host.model, host.single(1)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    image = features.flatten(0, 1)  # three tiles of 4 x 4 tokens, in order
    context = ImageContext(n=48, segments=[GridSegment(16 * t, 4, 4) for t in range(3)])
    kept = DivPruneConfig(keep=4).reduce(image, context).kept
    ids = inputs["input_ids"][0]
    start = int((ids == IMAGE_TOKEN).nonzero()[0])
    short = torch.cat([ids[:start], torch.full((4,), IMAGE_TOKEN), ids[start + 48:]])
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(short).clone()
        embeds[short == IMAGE_TOKEN] = image[kept]
        expected = model(inputs_embeds=embeds.unsqueeze(0)).logits
    with vtoken.patch(model, "divprune", keep=4) as handle:
        got = logits(model, **inputs)
        assert torch.equal(handle.stats.kept_indices[0], kept.cpu())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_batch_reads_its_runs_and_rows_at_once(host):
    """The runs of placeholders carry their rows, so a batch's prefill reads the device once more than dense's, not
    twice (the runs, then the rows' placeholder counts)."""
    inputs = host.batch()
    with OpCounter(host.model) as dense:
        logits(host.model, **inputs)
    with vtoken.patch(host.model, "divprune", keep=4), OpCounter(host.model) as patched:
        logits(host.model, **inputs)
    assert [s.syncs for s in patched.segments] == [s.syncs + 1 for s in dense.segments]


@pytest.mark.parametrize("ids, says", [
    (prompt(40), r"runs of \[40\], the inputs give 3 views \(tiles or frames\) of 16 tokens"),  # 48 needed
    (torch.cat([prompt(8, after=(7,)), torch.full((40,), IMAGE_TOKEN)]), r"runs of \[8, 40\]"),  # no whole tiles
    (torch.tensor([IMAGE_TOKEN, 5] * 4), "more runs of image tokens than views"),
])
def test_a_prompt_that_does_not_match_the_tiles_is_refused(host, ids, says):
    with vtoken.patch(host.model, "divprune", keep=4), pytest.raises(ValueError, match=says):
        logits(host.model, input_ids=ids.unsqueeze(0), pixel_values=torch.randn(3, 3, 112, 112))


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

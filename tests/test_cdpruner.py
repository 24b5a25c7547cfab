"""CDPruner's relevance against the release's rule, its conditioning, and its instruction oracle on the hosts (the
greedy MAP itself is in test_dpp_kernel.py).

The invariant tables (test_llava_invariants.py, test_llava_onevision.py, test_qwen_vl.py) hold it to keep-all, remove,
boundary = unpatched on the shortened input, batch = singles and cache = no cache on every host."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_llava_invariants import Host, logits

import vtoken
from vtoken.methods.base import ImageContext
from vtoken.methods.cdpruner import CDPrunerConfig, instruction_direction, instruction_relevance


def test_relevance_is_the_release_rule():
    torch.manual_seed(0)
    x, embeds = torch.randn(12, 16), torch.randn(7, 16)
    mask = torch.tensor([False, False, True, True, True, False, True])
    cos = F.normalize(x, dim=-1) @ F.normalize(embeds[mask], dim=-1).T  # (n, M)
    relevance = -cos.mean(-1)
    expected = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min() + 1e-6)
    units = F.normalize(x, dim=-1)
    got = instruction_relevance(units, instruction_direction(embeds, mask), -1.0)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    no_instruction = instruction_direction(embeds, torch.zeros(7, dtype=torch.bool))
    assert torch.equal(instruction_relevance(units, no_instruction, -1.0), torch.ones(12))  # one weight for all
    # batched over images: each image against its own instruction
    direction = instruction_direction(embeds, mask)
    batch = instruction_relevance(torch.stack([units, units.flip(0)]), torch.stack([no_instruction, direction]), 1.0)
    torch.testing.assert_close(batch[1], instruction_relevance(units.flip(0), direction, 1.0))
    assert torch.equal(batch[0], torch.ones(12))


def test_the_kept_tokens_follow_the_instruction():
    """The same image's tokens with two instructions: each keeps more of the tokens closer to (release: further
    from) its own instruction embedding."""
    torch.manual_seed(0)
    features = torch.randn(64, 32)
    a, b = features[:32].mean(0), features[32:].mean(0)
    kept = {}
    for name, target in (("a", a), ("b", b)):
        ctx = ImageContext(n=64, segments=[], instruction=lambda t=target: (t[None], torch.ones(1, dtype=torch.bool)))
        kept[name] = CDPrunerConfig(keep=16, relevance="similar").reduce(features, ctx).kept
    assert (kept["a"] < 32).sum() > (kept["b"] < 32).sum()


def test_no_instruction_and_no_condition_agree():
    torch.manual_seed(0)
    features = torch.randn(40, 16)
    bare = ImageContext(n=40, segments=[])
    empty = ImageContext(n=40, segments=[], instruction=lambda: (torch.randn(5, 16), torch.zeros(5, dtype=torch.bool)))
    plain = CDPrunerConfig(keep=10, relevance="uniform").reduce(features, bare).kept
    assert torch.equal(CDPrunerConfig(keep=10).reduce(features, empty).kept, plain)
    assert torch.equal(CDPrunerConfig(keep=10).reduce(features, bare).kept, plain)


def test_a_bad_relevance_is_named():
    with pytest.raises(ValueError, match="relevance"):
        vtoken.patch(torch.nn.Linear(2, 2), "cdpruner", relevance="clip")


@pytest.mark.parametrize("host_name", ["llava", "llava_next", "llava_onevision"])
def test_the_instruction_is_the_text_after_the_last_image(host_name, monkeypatch):
    """What the host hands the method: the LLM's input embeddings of the prompt row and the real text tokens after
    its last placeholder, the same in a left-padded batch as alone."""
    host = Host(host_name)
    seen = []

    def spy(self, images):
        for _, ctx in images:
            embeds, mask = ctx.instruction()
            seen.append(embeds[mask])
        return original(self, images)

    original = CDPrunerConfig.kernels
    monkeypatch.setattr(CDPrunerConfig, "kernels", spy)
    with vtoken.patch(host.model, "cdpruner", keep=0.25):
        for i in range(3):
            logits(host.model, **host.single(i))
        alone, seen[:] = list(seen), []
        logits(host.model, **host.batch())
    embed = host.model.model.get_input_embeddings()
    for i, row in enumerate(host.rows):
        after = row[int((row >= 98).nonzero().max()) + 1:]  # the tiny prompts' text after the image
        torch.testing.assert_close(alone[i], embed(after))
        torch.testing.assert_close(seen[i], embed(after))

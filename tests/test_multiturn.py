"""Multi-turn chat on a reused KV cache: a follow-up turn gives the same tokens as recomputing the whole conversation
with the same method and budget (in-LLM decisions pinned to the first prefill's, as in the cache = no-cache
invariant), for text-only follow-ups and for follow-ups that bring a new image. With decode FFN sparsity
(CoreMatching) the earlier answers' tokens that ran as single-token steps keep only the conversation's core neurons
in the recomputation too (``sparse_ffn_reference``)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_llava_invariants import (
    PRUNING,
    Host,
    decode_ffn_layers,
    method_of,
    pin_decisions,
    sparse_ffn_reference,
)
from tiny_models import IMAGE_TOKEN, PAD, cache_keyword, left_pad

import vtoken
from vtoken.adapters._compat import find_cache
from vtoken.adapters.vlm.cache import CacheLayout

GEN = dict(max_new_tokens=3, do_sample=False, pad_token_id=PAD, suppress_tokens=[IMAGE_TOKEN])


def with_cache(model, cache) -> dict:
    """The cache argument under this release's keyword (``cache`` from transformers 5.24, ``past_key_values``
    before)."""
    return {} if cache is None else {cache_keyword(model): cache}


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def host(request):
    return Host(request.param)


class Conversation:
    """Turns of one sample: ids so far (what generate() returned), the images so far, and the cache."""

    def __init__(self, host: Host, i: int):
        self.host = host
        self.ids = host.rows[i].unsqueeze(0)
        self.images = [i]
        self.cache = None
        self.stepped: list[int] = []  # columns of the tokens generate() fed one at a time (all answers but their last)

    def image_kwargs(self, images: list[int]) -> dict:
        out = {"pixel_values": torch.cat([self.host.pixels[j] for j in images])}
        if self.host.sizes[0] is not None:
            out["image_sizes"] = torch.cat([self.host.sizes[j] for j in images])
        return out

    def turn(self, model, new_tokens: torch.Tensor, new_image: int | None = None) -> torch.Tensor:
        """Append ``new_tokens`` (with one image's placeholders if ``new_image``) and generate on the cache."""
        self.ids = torch.cat([self.ids, new_tokens.unsqueeze(0)], 1)
        extra = {}
        if new_image is not None:
            self.images.append(new_image)
            extra = self.image_kwargs([new_image])
        if self.cache is None:
            extra = self.image_kwargs(self.images)
        out = model.generate(input_ids=self.ids, attention_mask=torch.ones_like(self.ids),
                             **with_cache(model, self.cache), return_dict_in_generate=True, **extra, **GEN)
        start = self.ids.shape[1]
        self.stepped += range(start, out.sequences.shape[1] - 1)
        self.cache = find_cache(out)
        self.ids = out.sequences
        return out.sequences[:, -3:]

    def recompute(self, model, handle) -> torch.Tensor:
        """The same last turn from scratch: the whole conversation, every image, no cache."""
        prompt = self.ids[:, :-3]
        length = prompt.shape[1]
        stepped = [c for c in self.stepped if c < length]
        ffn = decode_ffn_layers(model, handle)
        neurons = CacheLayout.of(self.cache).row_state["decode_neurons"] if ffn else None
        with sparse_ffn_reference(model, ffn, neurons, lambda rows: [rows - (length - c) for c in stepped]):
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 **self.image_kwargs(self.images), **GEN)
        return out[:, -3:]


def image_turn(host: Host, j: int) -> torch.Tensor:
    return torch.tensor([16, *([IMAGE_TOKEN] * host.counts[j]), 17, 18])


@pytest.mark.parametrize("follow_ups", ["text,text", "image", "text,image"])
@pytest.mark.parametrize("name", sorted(PRUNING))
def test_follow_up_turns_equal_recomputing_the_conversation(host, name, follow_ups):
    if "image" in follow_ups and getattr(vtoken.methods()[method_of(name)].config_cls, "conditioned", False):
        pytest.skip("a method conditioned on the question picks an image's tokens for the question that came with it; "
                    "recomputing the conversation would ask it the last question instead")
    model = host.model
    with vtoken.patch(model, method_of(name), **PRUNING[name]) as handle, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # in-LLM methods warn that a new image on a cache is not pruned inside
        pin_decisions(handle.config)
        chat = Conversation(host, 0)
        chat.turn(model, torch.tensor([], dtype=torch.long))
        for k, kind in enumerate(follow_ups.split(",")):
            if kind == "text":
                cached = chat.turn(model, torch.tensor([11, 12 + k, 13]))
            else:
                cached = chat.turn(model, image_turn(host, 2), new_image=2)
            assert torch.equal(cached, chat.recompute(model, handle)), f"turn {k + 2} ({kind})"


@pytest.mark.parametrize("name", ["todre", "random", "attn_topk", "transprune", "corematching"])
def test_a_left_padded_batch_continues_like_its_rows(host, name):
    """Rows of different lengths keep different numbers of tokens: the batch's follow-up equals each row's own
    two-turn conversation run alone."""
    model = host.model
    follow = torch.tensor([[11, 12, 13], [11, 14, 13]])
    with vtoken.patch(model, method_of(name), **PRUNING[name]), torch.no_grad():
        ids, mask = left_pad(host.rows[:2])
        first = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True,
                               **Conversation(host, 0).image_kwargs([0, 1]), **GEN)
        ids = torch.cat([first.sequences, follow], 1)
        mask = torch.cat([mask, torch.ones(2, ids.shape[1] - mask.shape[1], dtype=torch.long)], 1)
        batched = model.generate(input_ids=ids, attention_mask=mask, **with_cache(model, find_cache(first)),
                                 **GEN)[:, -3:]
        for row in range(2):
            alone = Conversation(host, row)
            alone.turn(model, torch.tensor([], dtype=torch.long))
            assert torch.equal(batched[row], alone.turn(model, follow[row])[0])


@pytest.mark.parametrize("name", ["attn_topk", "transprune"])
def test_a_cache_repeated_for_several_sequences_continues_like_its_row(host, name):
    """A caller who repeats a conversation's cache (``batch_repeat_interleave``, to sample several follow-ups) gets
    each repeat's answer of the row alone, and the layers of one pruning stage still share one record."""
    from vtoken.adapters.vlm.decoder import record_groups

    model = host.model
    with vtoken.patch(model, method_of(name), **PRUNING[name]), torch.no_grad():
        chat = Conversation(host, 0)
        chat.turn(model, torch.tensor([], dtype=torch.long))
        stages = len(record_groups(CacheLayout.of(chat.cache).pruned)[1])
        repeated = copy.deepcopy(chat.cache)
        repeated.batch_repeat_interleave(2)
        ids = torch.cat([chat.ids, torch.tensor([[11, 12, 13]])], 1).repeat(2, 1)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True,
                             **with_cache(model, repeated), **GEN)
        alone = chat.turn(model, torch.tensor([11, 12, 13]))
    assert torch.equal(out.sequences[:, -3:], alone.expand(2, -1))
    assert len(record_groups(CacheLayout.of(find_cache(out)).pruned)[1]) == stages


def test_each_cache_remembers_its_own_layout(host):
    """Two conversations interleaved on one patched model, and a deep copy of a cache, continue correctly."""
    model = host.model
    with vtoken.patch(model, "random", keep=0.25) as handle, torch.no_grad():
        a, b = Conversation(host, 0), Conversation(host, 1)
        a.turn(model, torch.tensor([], dtype=torch.long))
        b.turn(model, torch.tensor([], dtype=torch.long))
        branch = copy.copy(a)  # a second conversation from the same first turn, on a deep copy of its cache
        branch.cache, branch.images = copy.deepcopy(a.cache), list(a.images)
        assert torch.equal(a.turn(model, torch.tensor([11, 12, 13])), a.recompute(model, handle))
        assert torch.equal(branch.turn(model, torch.tensor([11, 15, 13])), branch.recompute(model, handle))


def test_a_conversation_that_does_not_continue_the_cache_is_refused(host):
    model = host.model
    with vtoken.patch(model, "random", keep=0.25), torch.no_grad():
        chat = Conversation(host, 0)
        chat.turn(model, torch.tensor([], dtype=torch.long))
        edited = chat.ids.clone()
        edited[0, 1] = 42  # an earlier turn changed, but the cache still holds the old one
        ids = torch.cat([edited, torch.tensor([[11, 12, 13]])], 1)
        with pytest.raises(ValueError, match="do not continue the conversation"):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **with_cache(model, chat.cache), **GEN)


def test_an_in_llm_pruned_cache_needs_its_method(host):
    model = host.model
    with torch.no_grad():
        with vtoken.patch(model, "attn_topk", keep=0.3):
            chat = Conversation(host, 0)
            chat.turn(model, torch.tensor([], dtype=torch.long))
        with vtoken.patch(model, "random", keep=0.25), pytest.raises(ValueError, match="pruned inside the LLM"):
            chat.turn(model, torch.tensor([11, 12, 13]))

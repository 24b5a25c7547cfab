"""The VLM mechanism's scoring inputs and records: attention recomputed from a layer's input against eager
attention, and the token counts each layer sees."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IMAGE_TOKEN, left_pad, prompt, tiny_llava, tiny_llava_next

import vtoken
from vtoken.adapters._compat import clip_parts
from vtoken.adapters.vlm.decoder import DecoderPruner
from vtoken.adapters.vlm.stats import VLMStats
from vtoken.adapters.vlm.tower import cls_attention
from vtoken.handle import Handle
from vtoken.methods.base import VisualTokenMethod


# -- attention recomputed from a layer's input == the layer's own (eager) attention --------------------------------
def test_cls_attention_matches_eager_vision_attention():
    model = tiny_llava("eager")
    tower = model.model.vision_tower
    px = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        out = tower(px, output_hidden_states=True, output_attentions=True)
        layer = clip_parts(tower)[1][1]
        mine = cls_attention(layer, out.hidden_states[1])
    torch.testing.assert_close(mine, out.attentions[1][:, :, 0].mean(1), atol=1e-5, rtol=1e-4)


class _Probe(VisualTokenMethod):
    """Records the recomputed attention of every row at one layer, keeps everything."""

    method_name = "probe"

    def __init__(self, layer):
        self.keep, self.layer, self.seen = 1.0, layer, None

    def score_layers(self, num_layers):
        return (self.layer,)

    def prune(self, ctx):
        B, L = ctx.valid.shape
        rows = torch.arange(L).expand(B, -1)
        self.seen = ctx.attention(rows)
        self.weights = torch.rand(B, L) * ctx.valid
        self.received = ctx.received(rows, self.weights)
        return torch.ones(B, L, dtype=torch.bool)


@pytest.mark.parametrize("factory", [tiny_llava, tiny_llava_next])
def test_attention_rows_match_eager_attention_with_padding(factory):
    model = factory("eager")
    lm = model.model.language_model

    handle = Handle(lm, "probe", None, "test")
    probe = _Probe(layer=2)
    pruner = DecoderPruner(lm, probe, VLMStats(), handle)
    ids, mask = left_pad([torch.tensor([1, 5, 6, 7, 8, 9]), torch.tensor([1, 5, 6, 9])])
    visual = torch.zeros_like(ids, dtype=torch.bool)
    visual[:, 2] = True
    pruner.begin_prefill(visual, mask.bool())
    with torch.no_grad():
        out = lm(input_ids=ids, attention_mask=mask, output_attentions=True)
    handle.remove()
    expected = out.attentions[2]
    real = mask.bool()
    for b in range(2):
        rows = real[b].nonzero().squeeze(1)
        torch.testing.assert_close(probe.seen[b][:, rows][:, :, rows], expected[b][:, rows][:, :, rows],
                                   atol=1e-5, rtol=1e-4)
    # the scoring primitive: weighted over query rows, averaged over heads, never every row's probabilities at once
    received = torch.einsum("br,brk->bk", probe.weights, expected.mean(1).float())
    torch.testing.assert_close(probe.received, received, atol=1e-5, rtol=1e-4)


# -- stats: the token counts each layer sees are what the config says ----------------------------------------------
def test_token_counts_per_layer_follow_the_config():
    model = tiny_llava()
    ids = prompt(64).unsqueeze(0)  # 3 + 64 + 4 = 71 tokens
    px = torch.randn(1, 3, 112, 112)
    with vtoken.patch(model, "attn_topk", keep=8, layer=2) as h, torch.no_grad():
        model(input_ids=ids, pixel_values=px)
        assert h.stats.tokens_per_layer == [[71], [71], [15], [15]]
        assert h.stats.visual_tokens_per_layer == [[64], [64], [8], [8]]
        alive = h.stats.visual_alive[2][0]  # LLM-input positions of the 8 survivors: image tokens sit at 3..66
        assert len(alive) == 8 and all(3 <= p < 67 for p in alive) and alive == sorted(alive)
    with vtoken.patch(model, "todre", keep=16, tau=1.0, stage2_layer=1) as h, torch.no_grad():
        model(input_ids=ids, pixel_values=px)
        assert h.stats.visual_tokens_in == [64] and h.stats.visual_tokens_kept == [16]
        assert h.stats.tokens_per_layer == [[23], [23], [7], [7]]  # visual tokens gone after layer 1
        assert h.stats.records[1]["removed"] == [True]
        assert h.stats.selection_time_s > 0 and h.stats.scoring_time_s > 0
    with vtoken.patch(model, "pool", keep=0.1) as h, torch.no_grad():  # 6.4 -> 6 tokens: a 3x2 grid
        model(input_ids=ids, pixel_values=px)
        assert h.stats.visual_tokens_kept == [6] and h.stats.tokens_per_layer == [[13]] * 4


def test_two_images_in_one_prompt_are_reduced_separately():
    model = tiny_llava()
    ids = torch.cat([prompt(64), torch.full((64,), IMAGE_TOKEN), torch.tensor([11, 12])]).unsqueeze(0)
    px = torch.randn(2, 3, 112, 112)
    with vtoken.patch(model, "todre", keep=10, stage2=False) as h, torch.no_grad():
        out = model(input_ids=ids, pixel_values=px).logits
        assert h.stats.visual_tokens_kept == [10, 10] and h.stats.visual_tokens_llm == [20]
    assert out.shape[1] == ids.shape[1] - 108

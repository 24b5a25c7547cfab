"""VisionZip: its split and token rule against plain re-derivations, keep-all, and the patched LLaVA against the
unpatched one fed VisionZip's tokens by hand (attention and keys read from the eager tower, not recomputed). The other
invariants run from the tables in test_llava_invariants.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import IMAGE_TOKEN, prompt, tiny_llava, tiny_llava_next

import vtoken
from vtoken.adapters import _compat
from vtoken.methods.visionzip import VisionZipConfig, contextual_targets, split_budget, visionzip_tokens


def test_the_split_is_the_releases():
    assert [split_budget(n, None) for n in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert split_budget(10, 3) == (7, 3) and split_budget(1, None) == (1, 0)
    assert contextual_targets(523, 10) == [0, 52, 104, 156, 208, 260, 312, 364, 416, 468]  # step 523 // 10


def plain_tokens(hidden, attention, keys, dominant, contextual):
    """VisionZip for one view, with Python lists: [CLS] + the top patches by attention in raster order, then each
    target (every step-th remaining token) plus the mean of the remaining tokens whose keys are closest to it."""
    T = hidden.shape[0]
    top = sorted(sorted(range(1, T), key=lambda t: -float(attention[t]))[: dominant - 1])
    out = [hidden[0]] + [hidden[t] for t in top]
    rest = [t for t in range(T) if t != 0 and t not in top]
    step = max(1, len(rest) // contextual) if contextual else 1
    targets = list(range(0, len(rest), step))[:contextual]
    normed = F.normalize(keys.float(), dim=-1)
    joined = {j: [] for j in range(len(targets))}
    for i, t in enumerate(rest):
        if i in targets or not targets:
            continue
        sims = [float(normed[t] @ normed[rest[c]]) for c in targets]
        joined[max(range(len(targets)), key=lambda j: (sims[j], -j))].append(hidden[t].float())
    for j, c in enumerate(targets):
        mean = torch.stack(joined[j]).mean(0) if joined[j] else 0
        out.append(hidden[rest[c]].float() + mean)
    return torch.stack([o.float() for o in out])


@pytest.mark.parametrize("dominant, contextual", [(5, 3), (9, 0), (1, 4), (12, 12)])
def test_tokens_equal_the_plain_rule(dominant, contextual):
    torch.manual_seed(dominant + contextual)
    V, T, C = 3, 30, 8
    hidden, attention, keys = torch.randn(V, T, C), torch.rand(V, T), torch.randn(V, T, 4)
    got = visionzip_tokens(hidden, attention, keys, dominant, contextual)
    assert got.shape == (V, dominant + contextual, C)
    for v in range(V):
        torch.testing.assert_close(got[v].float(), plain_tokens(hidden[v], attention[v], keys[v], dominant,
                                                                contextual), atol=1e-6, rtol=1e-6)


def test_keep_all_without_contextual_tokens_is_lossless():
    # 'full' features are [CLS] + every patch: keeping all of them, none merged, is the unpatched model
    model = tiny_llava(strategy="full")
    ids = prompt(65).unsqueeze(0)
    pixels = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
        with vtoken.patch(model, "visionzip", keep=1.0, contextual=0):
            got = model(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_patched_model_is_the_unpatched_one_on_visionzips_tokens():
    model = tiny_llava()
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    ids = prompt(64).unsqueeze(0)
    pixels = torch.randn(1, 3, 112, 112)
    layers = _compat.clip_parts(tower)[1]
    layer_index = len(layers) + model.config.vision_feature_layer
    layer = layers[layer_index]
    seen = {}
    hook = layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: seen.update(keys=out))
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True, output_attentions=True)
    hook.remove()
    hidden = out.hidden_states[model.config.vision_feature_layer]  # [CLS] included
    attention = out.attentions[layer_index].mean(1)[:, 0]  # [CLS] row, heads averaged
    keys = seen["keys"].view(1, hidden.shape[1], layer.self_attn.num_heads, -1).mean(2)
    dominant, contextual = split_budget(12, None)
    tokens = plain_tokens(hidden[0], attention[0], keys[0], dominant, contextual)
    with torch.no_grad():
        features = model.model.multi_modal_projector(tokens.unsqueeze(0))[0]
        short = torch.cat([ids[0, :3], torch.full((12,), IMAGE_TOKEN), ids[0, 3 + 64:]])
        embeds = model.model.get_input_embeddings()(short).clone()
        embeds[short == IMAGE_TOKEN] = features
        gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        expected = model.generate(inputs_embeds=embeds.unsqueeze(0), **gen)[:, -4:]
        expected_logits = model(inputs_embeds=embeds.unsqueeze(0)).logits[:, -1]
    tower.set_attn_implementation("sdpa")
    with vtoken.patch(model, "visionzip", keep=12) as handle, torch.no_grad():
        got = model.generate(input_ids=ids, pixel_values=pixels, **gen)[:, -4:]
        assert handle.stats.visual_tokens_llm == [12]
        got_logits = model(input_ids=ids, pixel_values=pixels).logits[:, -1]
    assert torch.equal(got, expected)
    torch.testing.assert_close(got_logits, expected_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(keep=0), "keep"),
    (dict(keep=8, contextual=8), "contextual=8 must be below keep=8"),
    (dict(contextual=-1), "contextual"),
])
def test_config_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VisionZipConfig(**kwargs)


def test_a_budget_the_tower_cannot_give_and_a_host_without_a_bridge_are_refused():
    model = tiny_llava()
    with pytest.raises(ValueError, match="keep=65"):
        vtoken.patch(model, "visionzip", keep=65)
    assert "forward" not in vars(model.model.multi_modal_projector)  # nothing was left behind by the refusal
    with pytest.raises(ValueError, match="visionzip"):
        vtoken.patch(tiny_llava_next(), "visionzip", keep=16)

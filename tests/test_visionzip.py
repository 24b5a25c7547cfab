"""VisionZip: its split and token rule against plain re-derivations, keep-all, the tower's attention and keys mapped
onto every host's tokens like the host's own features, and each patched host against the unpatched model fed
VisionZip's tokens by hand (attention and keys read from the eager tower, not recomputed). The other invariants run
from the tables in test_llava_invariants.py and test_llava_onevision.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import (
    IMAGE_TOKEN,
    prompt,
    qwen_pixels,
    tiny_internvl,
    tiny_llava,
    tiny_llava_next,
    tiny_llava_onevision,
    tiny_qwen,
)

import vtoken
from vtoken.adapters import _compat
from vtoken.adapters.internvl import InternVLPatch
from vtoken.adapters.llava import LlavaPatch, anyres_views
from vtoken.adapters.llava_onevision import LlavaOnevisionPatch, video_context
from vtoken.adapters.qwen_vl import QwenTowerReader
from vtoken.adapters.vlm.tower import segment_received
from vtoken.methods.visionzip import VisionZipConfig, contextual_targets, patch_tokens, split_budget, visionzip_tokens


def test_the_split_is_the_releases():
    assert [split_budget(n, None) for n in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert split_budget(10, 3) == (7, 3) and split_budget(1, None) == (1, 0)
    assert contextual_targets(523, 10) == [0, 52, 104, 156, 208, 260, 312, 364, 416, 468]  # step 523 // 10


def plain_contextual(hidden, keys, rest: list[int], contextual: int) -> dict[int, torch.Tensor]:
    """{target: its contextual token} with Python lists: every step-th of the ``rest`` tokens is a target, plus the
    mean of the other ``rest`` tokens whose keys are closest to it."""
    targets = list(range(0, len(rest), max(1, len(rest) // contextual)))[:contextual] if contextual else []
    normed = F.normalize(keys.float(), dim=-1)
    joined = {j: [] for j in range(len(targets))}
    for i, t in enumerate(rest):
        if i in targets or not targets:
            continue
        sims = [float(normed[t] @ normed[rest[c]]) for c in targets]
        joined[max(range(len(targets)), key=lambda j: (sims[j], -j))].append(hidden[t].float())
    return {rest[c]: hidden[rest[c]].float() + (torch.stack(joined[j]).mean(0) if joined[j] else 0)
            for j, c in enumerate(targets)}


def plain_tokens(hidden, attention, keys, dominant, contextual):
    """The release's rule for one view: [CLS] + the top patches by attention in raster order, then the contextual
    tokens."""
    T = hidden.shape[0]
    top = sorted(sorted(range(1, T), key=lambda t: -float(attention[t]))[: dominant - 1])
    rest = [t for t in range(T) if t != 0 and t not in top]
    merged = plain_contextual(hidden, keys, rest, contextual)
    return torch.stack([hidden[t].float() for t in [0, *top]] + list(merged.values()))


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


@pytest.mark.parametrize("host", ["llava", "internvl"])
def test_keep_all_without_contextual_tokens_is_lossless(host):
    # LLaVA-1.5's 'full' features are [CLS] + every patch; an InternVL tile's tokens are all patches
    if host == "llava":
        model, ids, pixels = tiny_llava(strategy="full"), prompt(65), torch.randn(1, 3, 112, 112)
    else:
        model, ids, pixels = tiny_internvl(), prompt(48), torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        expected = model(input_ids=ids.unsqueeze(0), pixel_values=pixels).logits
        with vtoken.patch(model, "visionzip", keep=1.0, contextual=0):
            got = model(input_ids=ids.unsqueeze(0), pixel_values=pixels).logits
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


def test_a_budget_the_tower_cannot_give_is_refused_and_every_vlm_host_reads_its_tower():
    model = tiny_llava()
    with pytest.raises(ValueError, match="keep=65"):
        vtoken.patch(model, "visionzip", keep=65)
    assert "forward" not in vars(model.model.multi_modal_projector)  # nothing was left behind by the refusal
    assert set(vtoken.methods()["visionzip"].hosts) == {"llava", "llava_next", "llava_onevision", "internvl", "qwen_vl"}


# -- the tower's attention and keys mapped onto every host's tokens -------------------------------------------------
class Maps:
    """A stand-in for a host's TowerReader that hands out given per-view maps."""

    source = "cls"

    def __init__(self, maps: torch.Tensor):
        self.maps = maps

    def view_maps(self) -> torch.Tensor:
        return self.maps


def projected_views(model, pixels: torch.Tensor, drop_cls: bool) -> torch.Tensor:
    """(views, patches, D) each view's projected patch features, before the host packs, pools or scales them."""
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        selected = hidden[model.config.vision_feature_layer]
        return model.model.multi_modal_projector(selected[:, 1:] if drop_cls else selected)


def as_maps(views: torch.Tensor, with_cls: bool) -> torch.Tensor:
    """Per-view maps whose 'attention' is the first feature channel and whose 'keys' are all of them (a zero [CLS]
    row first when the tower has one)."""
    maps = torch.cat([views[..., :1], views], dim=-1)
    return torch.cat([maps.new_zeros(maps.shape[0], 1, maps.shape[2]), maps], 1) if with_cls else maps


def assert_maps_are_the_features(tower, features: torch.Tensor, context) -> None:
    """The model's own features at every patch token, and nothing at its separators."""
    patches = patch_tokens(context)
    separators = sorted(set(range(context.n)) - set(patches.tolist()))
    torch.testing.assert_close(tower.keys[patches], features[patches], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tower.attention[patches], features[patches, 0], atol=1e-5, rtol=1e-5)
    assert torch.isinf(tower.attention[separators]).all() and not tower.keys[separators].any()


@pytest.mark.parametrize("size", [[112, 84], [84, 112], [56, 56], [112, 112], [100, 40]])
def test_llava_next_maps_every_crop_like_its_features(size):
    model = tiny_llava_next()
    sizes, pixels = torch.tensor([size]), torch.randn(1, 5, 3, 56, 56)
    views = anyres_views(size, model.config.image_grid_pinpoints, 56)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes,
                                                  return_dict=True).pooler_output[0]
    reader = Maps(as_maps(projected_views(model, pixels[0, :views], drop_cls=True), with_cls=True))
    with vtoken.patch(model, "visionzip", keep=8):
        context = LlavaPatch.of(model).image_contexts([features], reader, [size])[0]
        assert_maps_are_the_features(context.tower(), features, context)


@pytest.mark.parametrize("size, anyres", [([168, 140], True), ([300, 60], True), ([56, 56], True),
                                          ([84, 112], False)])
def test_llava_onevision_maps_crops_and_scaled_grids_like_their_features(size, anyres):
    model = tiny_llava_onevision()
    call = dict(pixel_values=torch.randn(1, 10, 3, 56, 56), image_sizes=torch.tensor([size]),
                batch_num_images=None if anyres else torch.tensor([1]))
    with vtoken.patch(model, "visionzip", keep=8):
        patch = LlavaOnevisionPatch.of(model)
        (context,), ((first, count, crops),) = patch.image_contexts(call)
        with torch.no_grad():
            features = model.model.get_image_features(**call, return_dict=True).pooler_output[0]
        reader = Maps(as_maps(projected_views(model, call["pixel_values"][0, :count], drop_cls=False), False))
        assert_maps_are_the_features(patch.tower_of(reader, context, first, count, crops), features, context)


def test_llava_onevision_maps_video_frames_like_their_pooled_features():
    model = tiny_llava_onevision()
    videos = torch.randn(2, 3, 3, 56, 56)
    with torch.no_grad():
        features = model.model.get_video_features(pixel_values_videos=videos, return_dict=True).pooler_output
    reader = Maps(as_maps(projected_views(model, videos.flatten(0, 1), drop_cls=False), False))
    with vtoken.patch(model, "visionzip", keep=4):
        patch = LlavaOnevisionPatch.of(model)
        for v in range(2):
            context = video_context(3, patch.grid_side())
            assert_maps_are_the_features(patch.tower_of(reader, context, 3 * v, 3, None), features[v], context)


def test_internvl_maps_each_token_to_its_pixel_shuffled_patches():
    model = tiny_internvl()
    torch.manual_seed(0)
    maps = torch.randn(3, 65, 6)  # [CLS] + 8 x 8 patches per view
    with vtoken.patch(model, "visionzip", keep=4):
        tokens = InternVLPatch.of(model).token_maps(Maps(maps))
    groups = model.model.pixel_shuffle(maps[:, 1:].reshape(3, 8, 8, 6), scale_factor=0.5).reshape(3, 16, 4, 6)
    torch.testing.assert_close(tokens[..., 0], groups[..., 0].sum(-1))
    torch.testing.assert_close(tokens[..., 1:], groups[..., 1:].mean(-2))


# -- VisionZip on the projected tokens of the other hosts, by hand --------------------------------------------------
def plain_boundary(features, attention, keys, dominant, contextual):
    """The boundary rule with Python lists: the top tokens by attention and the contextual tokens, each in its
    place's order."""
    T = features.shape[0]
    top = sorted(sorted(range(T), key=lambda t: -float(attention[t]))[:dominant])
    rest = [t for t in range(T) if t not in top]
    out = {t: features[t].float() for t in top} | plain_contextual(features, keys, rest, contextual)
    return torch.stack([out[t] for t in sorted(out)])


def eager_attention_and_keys(tower, layer_module, index: int, pixels: torch.Tensor, from_cls: bool):
    """(views, T) attention and (views, T, d) head-mean keys of one tower layer, read from the eager tower's
    ``output_attentions`` and its key projection (after InternViT's key norm), not recomputed."""
    seen = {}
    attn = getattr(layer_module, "self_attn", None) or layer_module.attention
    keys_module = getattr(attn, "k_norm", attn.k_proj)
    hook = keys_module.register_forward_hook(lambda m, a, out: seen.update(keys=out))
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            probs = tower(pixels, output_attentions=True).attentions[index].mean(1)  # heads averaged
    finally:
        tower.set_attn_implementation("sdpa")
        hook.remove()
    attention = probs[:, 0] if from_cls else probs.mean(1)
    views, T = attention.shape
    return attention, seen["keys"].view(views, T, attn.num_heads, -1).mean(2)


def shortened_logits(model, ids: torch.Tensor, runs: list[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
    """The unpatched model's logits on ``ids`` with each (start, length) run of placeholders replaced by tokens."""
    pieces, embeds, at = [], [], 0
    for start, length, tokens in runs:
        pieces += [ids[at:start], torch.full((tokens.shape[0],), IMAGE_TOKEN)]
        embeds.append(tokens)
        at = start + length
    short = torch.cat(pieces + [ids[at:]])
    with torch.no_grad():
        inputs = model.model.get_input_embeddings()(short).clone()
        inputs[short == IMAGE_TOKEN] = torch.cat(embeds).to(inputs.dtype)
        return model(inputs_embeds=inputs.unsqueeze(0)).logits


@pytest.mark.parametrize("runs", [[32], [16, 16]])
def test_internvl_keeps_the_cls_attentions_favourites_and_merges_the_rest(runs):
    # one run of 32 placeholders: one image of two tiles ranked together; two runs of 16: two one-tile images
    model = tiny_internvl()
    pixels = torch.randn(2, 3, 112, 112)
    between = [] if runs == [32] else [11, 12, 13]
    ids = prompt(16, after=(*between, *[IMAGE_TOKEN] * 16, 7, 8, 9, 10))
    tower = model.model.vision_tower
    layers = _compat.vision_blocks(tower)
    attention, keys = eager_attention_and_keys(tower, layers[-1], -1, pixels, from_cls=True)
    grouped = lambda t: t[:, 1:].reshape(2, 4, 2, 4, 2, -1)  # noqa: E731  (tile, row, 2, col, 2, ...)
    attention = grouped(attention.unsqueeze(-1)).sum(dim=(2, 4)).reshape(2, 16)
    keys = grouped(keys).mean(dim=(2, 4)).reshape(2, 16, -1)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    dominant, contextual = split_budget(6, None)
    images = [slice(0, 2)] if runs == [32] else [slice(0, 1), slice(1, 2)]
    kept = [plain_boundary(features[i].flatten(0, 1), attention[i].flatten(), keys[i].flatten(0, 1), dominant,
                           contextual) for i in images]
    starts = [3, 3 + 16 + len(between)][:len(runs)]
    expected = shortened_logits(model, ids, list(zip(starts, runs, kept)))
    with vtoken.patch(model, "visionzip", keep=6) as handle, torch.no_grad():
        got = model(input_ids=ids.unsqueeze(0), pixel_values=pixels).logits
        assert handle.stats.visual_tokens_kept == [6] * len(runs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_llava_onevision_keeps_the_most_attended_patches_without_a_cls_token():
    model = tiny_llava_onevision()
    pixels = torch.randn(2, 1, 3, 56, 56)  # two images in one prompt: a base view and a separator each
    call = dict(pixel_values=pixels, image_sizes=torch.tensor([[56, 56], [84, 112]]),
                batch_num_images=torch.tensor([2]))
    ids = torch.cat([prompt(17), torch.full((17,), IMAGE_TOKEN), torch.tensor([11, 12])])
    tower = model.model.vision_tower
    layers = _compat.clip_parts(tower)[1]
    attention, keys = eager_attention_and_keys(tower, layers[-1], -1, pixels.flatten(0, 1), from_cls=False)
    with torch.no_grad():
        features = model.model.get_image_features(**call, return_dict=True).pooler_output
    dominant, contextual = split_budget(5, None)
    images = [plain_boundary(features[i][:16], attention[i], keys[i], dominant, contextual) for i in range(2)]
    expected = shortened_logits(model, ids, [(3, 17, images[0]), (3 + 17 + 4, 17, images[1])])
    with vtoken.patch(model, "visionzip", keep=5) as handle, torch.no_grad():
        got = model(input_ids=ids.unsqueeze(0), **call).logits
        assert handle.stats.visual_tokens_kept == [5, 5]  # the separators are not patches: dropped
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_todres_pivot_on_internvl_is_the_cls_attentions_favourite():
    model = tiny_internvl()
    pixels = torch.randn(1, 3, 112, 112)
    tower = model.model.vision_tower
    attention, _ = eager_attention_and_keys(tower, _compat.vision_blocks(tower)[-1], -1, pixels, from_cls=True)
    expected = attention[:, 1:].reshape(1, 4, 2, 4, 2).sum(dim=(2, 4)).reshape(16)
    with vtoken.patch(model, "todre", keep=4):
        patch = InternVLPatch.of(model)
        with torch.no_grad():
            model.model.get_image_features(pixel_values=pixels, return_dict=True)
        (item,) = patch.items.values()
        torch.testing.assert_close(item.context.pivot_scores(), expected, atol=1e-6, rtol=1e-5)


# -- Qwen-VL: the last block's attention, merged tokens in the features' order -------------------------------------
def qwen_call(model):
    torch.manual_seed(0)
    grids = torch.tensor([[1, 8, 12], [2, 4, 8]])  # an image, and a two-frame video-like grid
    pixels = torch.cat([qwen_pixels(model, *thw) for thw in grids.tolist()])
    return dict(pixel_values=pixels, image_grid_thw=grids, return_dict=True)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_merged_tokens_come_in_the_features_order(family):
    model = tiny_qwen(family)
    visual = model.model.visual
    reader = QwenTowerReader(visual, model.config.vision_config.spatial_merge_size)
    seen = {}
    hook = visual.blocks[-1].register_forward_hook(lambda m, a, out: seen.update(out=out))
    with torch.no_grad():
        out = reader.capture(model.model.get_image_features, qwen_call(model))
        merged = reader.merged_order(visual.merger(seen["out"]))
    hook.remove()
    torch.testing.assert_close(merged, torch.cat(list(out.pooler_output)))
    assert (reader.window is not None) == (family == "qwen2_5_vl")  # only Qwen2.5-VL's tower reorders windows
    assert _compat.QWEN_WINDOW_PERMUTE not in vars(visual)  # the recording shadow is gone


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_attention_is_the_last_blocks_averaged_per_frame_or_window(family):
    import importlib

    model = tiny_qwen(family)
    visual = model.model.visual
    rotary = importlib.import_module(type(visual).__module__).apply_rotary_pos_emb_vision
    reader = QwenTowerReader(visual, model.config.vision_config.spatial_merge_size)
    with torch.no_grad():
        reader.capture(model.model.get_image_features, qwen_call(model))
        x, cu_seqlens, (cos, sin) = reader.call
        block = visual.blocks[-1]
        S = x.shape[0]
        q, k, _ = block.attn.qkv(block.norm1(x)).reshape(S, 3, block.attn.num_heads, -1).unbind(1)
        keys = k.mean(dim=1)
        q, k = rotary(q, k, cos, sin)
        received = torch.zeros(S)
        bounds = cu_seqlens.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):  # each frame or window on its own, plainly
            probs = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * block.attn.scaling, dim=-1)
            received[a:b] = probs.mean(dim=0).mean(dim=0)
        unit = model.config.vision_config.spatial_merge_size ** 2
        expected = reader.merged_order(received.view(-1, unit).sum(-1))
        expected_keys = reader.merged_order(keys.view(-1, unit, keys.shape[-1]).mean(1))
        maps = reader.token_maps()
    assert len(bounds) > 2  # several segments, so the masking matters
    few_rows = segment_received(q.float(), k.float(), block.attn.scaling, cu_seqlens, block=S * 4 * 7)  # 7 rows a chunk
    torch.testing.assert_close(few_rows, received, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps[:, 0], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps[:, 1:], expected_keys, atol=1e-6, rtol=1e-5)

"""The invariants of docs/design.md on tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL models built from configs: images of
different resolutions, videos, mixed batches, M-RoPE positions, cached decoding, multi-turn chat."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_llava_invariants import (
    KEEP_ALL,
    PRUNING,
    assert_sdpa_equals_eager,
    decode_ffn_layers,
    logits,
    method_of,
    no_cache_greedy,
    pin_decisions,
)
from tiny_models import (
    PAD,
    QWEN_FAMILIES,
    QWEN_IMAGE,
    QWEN_VIDEO,
    cache_keyword,
    hooks_of,
    left_pad,
    qwen_pixels,
    qwen_prompt,
    qwen_token_types,
    tiny_qwen,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtoken
from vtoken.adapters._compat import find_cache
from vtoken.adapters.vlm.cache import CacheLayout

# every LLaVA-side method Qwen-VL takes (TokenFLEX is LLaVA-only); pruning from layer 1 runs inside Qwen3-VL's
# deepstack span (features added after layers 0 and 1)
QWEN_PRUNING = {name: config for name, config in PRUNING.items()
                if "qwen_vl" in vtoken.methods()[method_of(name)].hosts}
QWEN_PRUNING["attn_topk_layer1"] = dict(keep=0.3, layer=1)


def method(name: str) -> str:
    return method_of(name.replace("_layer1", ""))


GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD, suppress_tokens=[QWEN_IMAGE, QWEN_VIDEO])
# (kind, temporal patches, patch rows, patch cols): images of two resolutions and a 2-frame video
ITEMS = [("image", 1, 8, 8), ("image", 1, 8, 12), ("video", 2, 8, 8)]


class QwenHost:
    """A tiny Qwen-VL plus three single-item prompts of different sizes and lengths."""

    def __init__(self, family: str, attn: str = "sdpa"):
        self.family = family
        self.model = tiny_qwen(family, attn)
        torch.manual_seed(1)
        self.pixels = [qwen_pixels(self.model, t, h, w) for _, t, h, w in ITEMS]
        self.counts = [t * h * w // 4 for _, t, h, w in ITEMS]
        frames = [t if family == "qwen3_vl" else 1 for _, t, _, _ in ITEMS]  # Qwen3-VL: one group per frame
        self.rows = [qwen_prompt([(kind, n)], after=(7, 8, 9, 10)[: 2 + i], frames=f)
                     for i, ((kind, *_), n, f) in enumerate(zip(ITEMS, self.counts, frames))]

    def vision(self, indices: list[int]) -> dict:
        """Pixels and grids of items ``indices`` (images and videos in order, as the placeholders come)."""
        out = {}
        for kind, pixels_key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            chosen = [i for i in indices if ITEMS[i][0] == kind]
            if chosen:
                out[pixels_key] = torch.cat([self.pixels[i] for i in chosen])
                out[f"{kind}_grid_thw"] = torch.tensor([ITEMS[i][1:] for i in chosen])
        return out

    def single(self, i: int) -> dict:
        ids = self.rows[i].unsqueeze(0)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=qwen_token_types(ids),
                    **self.vision([i]))

    def batch(self, indices=(0, 1, 2)) -> dict:
        ids, mask = left_pad([self.rows[i] for i in indices])
        return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=qwen_token_types(ids),
                    **self.vision(list(indices)))


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def host(request):
    return QwenHost(request.param)


def greedy(model, n: int = 4, **inputs):
    with torch.no_grad():
        return model.generate(**inputs, **{**GEN, "max_new_tokens": n})[:, -n:]


@pytest.mark.parametrize("name", sorted(KEEP_ALL))
def test_keep_all_is_lossless(host, name):
    inputs = host.batch()
    ref, ref_tokens = logits(host.model, **inputs), greedy(host.model, **inputs)
    with vtoken.patch(host.model, name, **KEEP_ALL[name]):
        torch.testing.assert_close(logits(host.model, **inputs), ref, atol=1e-5, rtol=0)
        assert torch.equal(greedy(host.model, **inputs), ref_tokens)


@pytest.mark.parametrize("name", ["todre", "attn_topk", "pool"])
def test_remove_restores(host, name):
    inputs = host.single(2)
    ref = logits(host.model, **inputs)
    snapshot = hooks_of(host.model)
    with vtoken.patch(host.model, method_of(name), **PRUNING[name]):
        assert logits(host.model, **inputs).shape[1] <= ref.shape[1]
    assert hooks_of(host.model) == snapshot
    assert torch.equal(logits(host.model, **inputs), ref)


BOUNDARY = {"todre": dict(keep=0.25, stage2=False), "random": dict(keep=0.25), "divprune": dict(keep=0.25),
            "pool": dict(keep=0.25), "pool_temporal": dict(keep=0.25, temporal=True)}


@pytest.mark.parametrize("name", sorted(BOUNDARY))
@pytest.mark.parametrize("item", [0, 2], ids=["image", "video"])
def test_boundary_equals_unpatched_on_the_shortened_input_with_original_positions(host, name, item):
    """The unpatched model, fed the kept features at the kept tokens' own placeholders, with the M-RoPE positions of
    the full prompt gathered for them, gives the patched model's logits."""
    model, inputs = host.model, host.single(item)
    kind = ITEMS[item][0]
    with torch.no_grad():
        encoder = getattr(model.model, f"get_{kind}_features")
        full = encoder(inputs["pixel_values" if kind == "image" else "pixel_values_videos"],
                       inputs[f"{kind}_grid_thw"], return_dict=True)
        positions, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                                  image_grid_thw=inputs.get("image_grid_thw"),
                                                  video_grid_thw=inputs.get("video_grid_thw"))
    with vtoken.patch(model, method_of(name.replace("_temporal", "")), **BOUNDARY[name]) as handle:
        out = logits(model, **inputs)
        reduction_places = handle.stats.kept_indices[0]
    placeholder = QWEN_IMAGE if kind == "image" else QWEN_VIDEO
    where = (inputs["input_ids"][0] == placeholder).nonzero().squeeze(1)
    if reduction_places is None:  # pooling: each pooled token sits at its window's centre, found by re-running it
        method = vtoken.make_config(vtoken.methods()["pool"], BOUNDARY[name])
        from vtoken.adapters.qwen_vl import grid_context

        ctx = grid_context(ITEMS[item][1:], 2, kind == "video")
        reduction = method.reduce(full.pooler_output[0], ctx)
        places, reduced = reduction.anchors, reduction.features
        deep = [method.reduce(d[0], ctx).features for d in getattr(full, "deepstack_features", None) or []]
    else:
        places, reduced = reduction_places, full.pooler_output[0][reduction_places]
        deep = [d[0][reduction_places] for d in getattr(full, "deepstack_features", None) or []]
    drop = torch.zeros_like(inputs["input_ids"][0], dtype=torch.bool)
    drop[where] = True
    drop[where[places]] = False
    keep = ~drop
    encoded = BaseModelOutputWithPooling(pooler_output=[reduced])
    if deep:
        encoded.deepstack_features = [[d] for d in deep]
    short = inputs["input_ids"][:, keep]
    expected = logits(model, input_ids=short, mm_token_type_ids=qwen_token_types(short),
                      position_ids=positions[:, :, keep], mm_encoder_outputs={kind: encoded})
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(QWEN_PRUNING))
def test_a_mixed_batch_equals_singles(host, name, attn):
    """Images of two resolutions and a video, left-padded in one batch, give each row's tokens run alone."""
    model = host.model
    model.model.language_model.set_attn_implementation(attn)
    try:
        with vtoken.patch(model, method(name), **QWEN_PRUNING[name]) as handle:
            singles = torch.cat([greedy(model, **host.single(i)) for i in range(3)])
            counts = []
            for i in range(3):
                logits(model, **host.single(i))
                counts.append([layer[0] for layer in handle.stats.tokens_per_layer])
            batched = greedy(model, **host.batch())
            logits(model, **host.batch())
            batch_counts = handle.stats.tokens_per_layer
    finally:
        model.model.language_model.set_attn_implementation("sdpa")
    assert torch.equal(batched, singles)
    assert [list(layer) for layer in batch_counts] == [list(c) for c in zip(*counts)]


@pytest.mark.parametrize("name", sorted(QWEN_PRUNING))
def test_cached_generate_equals_the_no_cache_loop(host, name):
    """Decode FFN sparsity (CoreMatching) is compared with the zero-masking reference, as on LLaVA."""
    model, inputs = host.model, host.batch()
    with vtoken.patch(model, method(name), **QWEN_PRUNING[name]) as handle:
        pin_decisions(handle.config)
        with torch.no_grad():
            out = model.generate(**inputs, **GEN, return_dict_in_generate=True)
        ffn = decode_ffn_layers(model, handle)
        neurons = CacheLayout.of(find_cache(out)).row_state["decode_neurons"] if ffn else None
        cached = out.sequences[:, inputs["input_ids"].shape[1]:]
        loop, _ = no_cache_greedy(model, inputs, cached.shape[1], ffn, neurons, suppress=[QWEN_IMAGE, QWEN_VIDEO],
                                  growing=("mm_token_type_ids",))
        assert torch.equal(cached, loop)


@pytest.mark.parametrize("name", sorted(QWEN_PRUNING))
def test_sdpa_and_eager_agree(host, name):
    assert_sdpa_equals_eager(host.model, host.batch(), method(name), QWEN_PRUNING[name])


def test_video_tokens_per_frame(host):
    """A 2-frame video of 16 merged tokens per frame: pool keeps a quarter of each frame; temporal pooling averages
    the two frames and keeps a quarter of the video in all, at the first frame's places."""
    inputs = host.single(2)
    with vtoken.patch(host.model, "pool", keep=0.25) as handle:
        logits(host.model, **inputs)
        assert handle.stats.tokens_per_frame == [[4, 4]]
    with vtoken.patch(host.model, "pool", keep=0.25, temporal=True) as handle:
        logits(host.model, **inputs)
        assert handle.stats.tokens_per_frame == [[8, 0]] and handle.stats.visual_tokens_kept == [8]
    with vtoken.patch(host.model, "random", keep=0.25) as handle:
        logits(host.model, **inputs)
        assert sum(handle.stats.tokens_per_frame[0]) == 8 and len(handle.stats.tokens_per_frame[0]) == 2


@pytest.mark.parametrize("name", ["todre", "random", "pool", "attn_topk"])
def test_follow_up_turns_equal_recomputing_the_conversation(host, name):
    """Turns 2 and 3 are text on the reused cache (transformers' own Qwen-VL generate() cannot continue a cache with
    a new image: its M-RoPE positions need every image's grid, its encoder only the new ones)."""
    model = host.model
    with vtoken.patch(model, method_of(name), **PRUNING[name]) as handle, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pin_decisions(handle.config)
        ids, cache = host.rows[2].unsqueeze(0), None  # the video
        for turn in range(3):
            kwargs = host.vision([2]) if cache is None else {cache_keyword(model): cache}
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 mm_token_type_ids=qwen_token_types(ids), return_dict_in_generate=True,
                                 output_scores=True, **kwargs, **GEN)
            cache = find_cache(out)
            if turn:
                prompt = out.sequences[:, :-4]
                again = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                       mm_token_type_ids=qwen_token_types(prompt), return_dict_in_generate=True,
                                       output_scores=True, **host.vision([2]), **GEN)
                assert torch.equal(out.sequences[:, -4:], again.sequences[:, -4:]), f"turn {turn + 1}"
                torch.testing.assert_close(torch.stack(out.scores), torch.stack(again.scores), atol=1e-4, rtol=1e-4)
            ids = torch.cat([out.sequences, torch.tensor([[11, 12 + turn, 13]])], 1)


def padded_pair(host) -> dict:
    """Two copies of the first image behind prompts of different lengths, left-padded: every row keeps as many tokens,
    so the shortened prompts keep the caller's padding and nothing else."""
    row = host.rows[0]
    ids, mask = left_pad([row, torch.cat([row[:1], row[2:]])])
    vision = {key: torch.cat([value, value]) for key, value in host.vision([0]).items()}
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=qwen_token_types(ids), **vision)


@pytest.mark.parametrize("prompts", ["image", "video", "padded", "mixed"])
@pytest.mark.parametrize("name", sorted(BOUNDARY))
def test_static_cache_and_compiled_decode_give_the_eager_dynamic_tokens(host, name, prompts):
    """Decode steps on a static cache take generate()'s [text, t, h, w] rows: only the text row (the cache's slot)
    moves down by the shift, the M-RoPE rows continue from the rope deltas the prefill recorded."""
    from test_compile import assert_static_and_compiled_match

    torch._dynamo.reset()
    inputs = {"image": host.single(0), "video": host.single(2), "padded": padded_pair(host),
              "mixed": host.batch()}[prompts]  # mixed: rows keep different numbers of tokens (filler slots)
    gen = dict(GEN, max_new_tokens=6, return_dict_in_generate=True, output_scores=True)
    with vtoken.patch(host.model, method_of(name.replace("_temporal", "")), **BOUNDARY[name]), torch.no_grad():
        eager = host.model.generate(**inputs, **gen)
        assert_static_and_compiled_match(host.model, inputs, eager, gen)


@pytest.mark.parametrize("prompts", ["video", "mixed"])
@pytest.mark.parametrize("name", ["todre_stage2_fires", "attn_topk", "attn_topk_layer1", "corematching_keep"])
def test_in_llm_pruning_on_a_static_cache_gives_the_eager_dynamic_tokens(host, name, prompts):
    """A layer pruned inside the LLM fills fewer slots; its masks are moved onto them at the static cache's width.
    The decoder compiled whole (``fullgraph``, M-RoPE and deepstack included) runs the pruned prefill as one graph and
    gives the same tokens, ToDRE's stage 2 masking the visual tokens it drops there."""
    from test_compile import assert_static_and_compiled_match
    from test_hardening import decoder_compiled_whole

    torch._dynamo.reset()
    inputs = {"video": host.single(2), "mixed": host.batch()}[prompts]
    gen = dict(GEN, max_new_tokens=4, return_dict_in_generate=True, output_scores=True)
    with vtoken.patch(host.model, method_of(name), **QWEN_PRUNING[name]) as handle, torch.no_grad():
        eager = host.model.generate(**inputs, **gen)
        layers = handle.stats.visual_tokens_per_layer
        assert layers[-1] != layers[0], layers
        assert_static_and_compiled_match(host.model, inputs, eager, gen)
        with decoder_compiled_whole(host.model):
            whole = host.model.generate(**inputs, cache_implementation="static", disable_compile=True, **gen)
        assert torch.equal(whole.sequences, eager.sequences)
        torch.testing.assert_close(torch.stack(whole.scores), torch.stack(eager.scores), atol=1e-4, rtol=1e-4)
        assert handle.stats.visual_tokens_per_layer == layers


def test_in_llm_pruning_refuses_a_static_cache_with_sliding_window_layers():
    """A sliding-window layer's static slots roll at the dense count, which a pruned layer no longer has."""
    host = QwenHost("qwen2_vl")
    model, inputs = tiny_qwen("qwen2_vl", sliding_window=256), host.single(0)
    with vtoken.patch(model, "attn_topk", keep=0.3), torch.no_grad():
        eager = model.generate(**inputs, **GEN)
        with pytest.raises(ValueError, match=r"attn_topk.* inside the LLM.*got sliding-window layers \[1, 2, 3\]"):
            model.generate(**inputs, cache_implementation="static", **GEN)
        assert torch.equal(model.generate(**inputs, **GEN), eager)  # nothing was left half-done
    with vtoken.patch(model, "divprune", keep=0.25), torch.no_grad():  # a boundary method takes it
        model.generate(**inputs, cache_implementation="static", **GEN)


def test_a_static_decode_step_has_no_graph_break_inside_the_decoder(host):
    from test_compile import assert_a_static_step_breaks_only_around_the_base_model

    torch._dynamo.reset()
    with vtoken.patch(host.model, "divprune", keep=0.25), torch.no_grad():
        out = host.model.generate(**host.single(2), cache_implementation="static", return_dict_in_generate=True,
                                  **dict(GEN, max_new_tokens=2))
        assert_a_static_step_breaks_only_around_the_base_model(host.model, out, f"modeling_{host.family}")


def test_bad_inputs_get_clear_errors(host):
    model, inputs = host.model, host.single(0)
    with vtoken.patch(model, "todre", keep=0.25), pytest.raises(ValueError, match="position_ids"):
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        logits(model, inputs_embeds=embeds, **{k: v for k, v in inputs.items() if k != "input_ids"})
    with pytest.raises(ValueError, match="does not support"):
        vtoken.patch(model, "token_clustering")


def test_qwen3_deepstack_is_added_at_the_tokens_still_alive(monkeypatch):
    """While an in-LLM method prunes, the deepstack features of each visual token still alive are added after the
    first decoder layers: checked against a loop over tokens, with pruning from layer 1 (inside the deepstack span)."""
    from vtoken.adapters.qwen_vl import DeepstackInjector

    host = QwenHost("qwen3_vl")
    seen = {}
    make_add = DeepstackInjector.make_add

    def recording(self, index):
        add = make_add(self, index)

        def wrapped(module, args, output):
            state = self.patch.decoder.state
            result = add(module, args, output)
            seen[index] = (output, state.alive, state.live, self.pending, result)
            return result

        return wrapped

    monkeypatch.setattr(DeepstackInjector, "make_add", recording)
    inputs = host.batch()
    with vtoken.patch(host.model, "attn_topk", keep=0.3, layer=1), torch.no_grad():
        host.model(**inputs)
    for index in (0, 1):
        before, alive, live, (masks, embeds), after = seen[index]
        rank = (masks.flatten().long().cumsum(0) - 1).view_as(masks)
        expected = before.clone()
        for b in range(before.shape[0]):
            for j in range(before.shape[1]):
                pos = j if alive is None else int(alive[b, j])
                if (live is None or bool(live[b, j])) and bool(masks[b, pos]):
                    expected[b, j] += embeds[index][rank[b, pos]]
        torch.testing.assert_close(after, expected)
    assert seen[0][1] is None and seen[1][1].shape[1] < inputs["input_ids"].shape[1]  # layer 1 ran pruned


@pytest.mark.parametrize("name", ["random", "todre", "attn_topk", "transprune"])
def test_beams_with_several_returned_sequences(host, name):
    """num_beams=3, num_return_sequences=2 on a batch of two: generate() repeats each prompt for its beams after
    computing the M-RoPE deltas per prompt; keep-all equals the unpatched model, and pruned rows equal singles."""
    beams = dict(GEN, num_beams=3, num_return_sequences=2, max_new_tokens=3)
    batch = host.batch((0, 2))
    with torch.no_grad():
        reference = host.model.generate(**batch, **beams)
        with vtoken.patch(host.model, method_of(name), **KEEP_ALL[name]):
            assert torch.equal(host.model.generate(**batch, **beams), reference)
        with vtoken.patch(host.model, method_of(name), **PRUNING[name]):
            together = host.model.generate(**batch, **beams)[:, -3:]
            for row, i in enumerate((0, 2)):
                alone = host.model.generate(**host.single(i), **beams)[:, -3:]
                assert torch.equal(together[2 * row: 2 * row + 2], alone)

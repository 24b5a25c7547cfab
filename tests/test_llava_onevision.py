"""LLaVA-OneVision beyond one image per prompt: the token layouts vtoken derives against the model's own packing, and
the invariants of docs/design.md on prompts with several images, with videos, and with both, alone and batched.
(One image per prompt runs the whole LLaVA invariant set in test_llava_invariants.py.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_llava_invariants import (
    BOUNDARY_ONLY,
    KEEP_ALL,
    PRUNING,
    SUPPRESS,
    assert_sdpa_equals_eager,
    decode_ffn_layers,
    logits,
    method_of,
    no_cache_greedy,
    pin_decisions,
)
from tiny_models import (
    BOS,
    IMAGE_TOKEN,
    ONEVISION_PINPOINTS,
    PAD,
    VIDEO_TOKEN,
    left_pad,
    tiny_llava_onevision,
)

import vtoken
from vtoken.adapters._compat import find_cache
from vtoken.adapters.llava_onevision import image_context, video_context
from vtoken.adapters.vlm.cache import CacheLayout

ONEVISION = {name: config for name, config in PRUNING.items()
             if "llava_onevision" in vtoken.methods()[method_of(name)].hosts}
GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD, suppress_tokens=SUPPRESS)
FRAMES = 3


@pytest.fixture(scope="module")
def model():
    return tiny_llava_onevision()


def test_every_method_but_the_projector_ones_runs_here():
    runs = {name for name, info in vtoken.methods().items() if "llava_onevision" in info.hosts}
    assert {"todre", "divprune", "random", "pool", "attn_topk", "transprune", "corematching", "pyramiddrop",
            "dart", "cdpruner", "visionzip"} <= runs
    assert "tokenflex" not in runs  # no OneVision projector bridge


# -- layouts ------------------------------------------------------------------------------------------------------
def separators(context) -> list[int]:
    """Where the layout puts image_newline tokens: the end of every row of a grid with separators, and every token
    outside the grids."""
    inside, out = set(), []
    for seg in context.segments:
        inside.update(range(seg.start, seg.start + seg.length))
        if seg.newline:
            out += [seg.start + r * (seg.cols + 1) + seg.cols for r in range(seg.rows)]
    return sorted(out + [i for i in range(context.n) if i not in inside])


def is_newline(model, features: torch.Tensor) -> torch.Tensor:
    return (features == model.model.image_newline.to(features.dtype)).all(-1)


@given(height=st.integers(20, 400), width=st.integers(20, 400), anyres=st.booleans())
def test_image_layout_matches_the_model(model, height, width, anyres):
    """Length and separator places of an image, scaled-down grids included, as the model packs them."""
    sizes = torch.tensor([[height, width]])
    pixels = torch.randn(1, 10, 3, 56, 56)
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes, return_dict=True,
                                             batch_num_images=None if anyres else torch.tensor([2]))
    features = out.pooler_output[0]
    context = image_context([height, width], ONEVISION_PINPOINTS, 56, 4, "anyres_max_2", anyres)
    assert context.n == features.shape[0]
    assert torch.nonzero(is_newline(model, features)).flatten().tolist() == separators(context)


def test_video_layout_matches_the_model(model):
    with torch.no_grad():
        out = model.model.get_video_features(pixel_values_videos=torch.randn(2, FRAMES, 3, 56, 56), return_dict=True)
    context = video_context(FRAMES, 4)
    assert out.pooler_output.shape[1] == context.n == FRAMES * 4 + 1
    assert torch.nonzero(is_newline(model, out.pooler_output[0])).flatten().tolist() == separators(context)
    assert context.frames.tolist() == [0] * 4 + [1] * 4 + [2] * 5  # the separator counts with the last frame


def test_a_bad_aspect_ratio_is_named():
    with pytest.raises(ValueError, match="vision_aspect_ratio must be 'anyres_max_<N>'"):
        image_context([100, 100], ONEVISION_PINPOINTS, 56, 4, "anyres", True)


# -- prompts with several images, videos, both ------------------------------------------------------------------------
class Rows:
    """Four prompts: one large image (AnyRes, scaled down), two images (base views), a video, an image (AnyRes) and
    a video."""

    KINDS = [["image"], ["image", "image"], ["video"], ["image", "video"]]

    def __init__(self, model):
        torch.manual_seed(2)
        self.model = model
        sizes = iter([[168, 140], [56, 56], [112, 84], [84, 112]])
        self.items = [[(kind, torch.randn(10, 3, 56, 56) if kind == "image" else torch.randn(FRAMES, 3, 56, 56),
                        next(sizes) if kind == "image" else None) for kind in kinds] for kinds in self.KINDS]
        self.ids = []
        for i, items in enumerate(self.items):
            row = [BOS, 5, 6][: 2 + i % 2]
            images = sum(kind == "image" for kind, _, _ in items)
            for kind, pixels, size in items:
                n = self.count(kind, pixels, size, anyres=images == 1)  # a prompt's only image gets AnyRes
                row += [IMAGE_TOKEN if kind == "image" else VIDEO_TOKEN] * n + [7]
            self.ids.append(torch.tensor(row + [8, 9][: 1 + i % 2]))

    def count(self, kind, pixels, size, anyres: bool) -> int:
        with torch.no_grad():
            if kind == "video":
                return self.model.model.get_video_features(pixel_values_videos=pixels[None],
                                                           return_dict=True).pooler_output.shape[1]
            return self.model.model.get_image_features(
                pixel_values=pixels[None], image_sizes=torch.tensor([size]), return_dict=True,
                batch_num_images=torch.tensor([1 if anyres else 2])).pooler_output[0].shape[0]

    def inputs(self, rows: list[int]) -> dict:
        ids, mask = left_pad([self.ids[r] for r in rows])
        out = dict(input_ids=ids, attention_mask=mask)
        images = [(p, s) for r in rows for kind, p, s in self.items[r] if kind == "image"]
        videos = [p for r in rows for kind, p, _ in self.items[r] if kind == "video"]
        if images:
            out["pixel_values"] = torch.stack([p for p, _ in images])
            out["image_sizes"] = torch.tensor([s for _, s in images])
            out["batch_num_images"] = torch.tensor([sum(k == "image" for k, _, _ in self.items[r]) for r in rows])
        if videos:
            out["pixel_values_videos"] = torch.stack(videos)
        return out


@pytest.fixture(scope="module")
def rows(model):
    return Rows(model)


def greedy(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, **GEN)[:, -GEN["max_new_tokens"]:]


@pytest.mark.parametrize("name", sorted(n for n in KEEP_ALL if n in ONEVISION))
def test_keep_all_is_lossless(model, rows, name):
    inputs = rows.inputs([0, 1, 2, 3])
    ref, ref_tokens = logits(model, **inputs), greedy(model, **inputs)
    with vtoken.patch(model, name, **KEEP_ALL[name]) as handle:
        out, tokens = logits(model, **inputs), greedy(model, **inputs)
        assert handle.stats.visual_tokens_llm == [int((ids >= VIDEO_TOKEN).sum()) for ids in rows.ids]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("name", sorted(ONEVISION))
def test_a_mixed_batch_equals_singles(model, rows, name):
    """Rows with one image, two images, a video, an image and a video, left-padded to different lengths."""
    with vtoken.patch(model, method_of(name), **PRUNING[name]) as handle:
        singles = torch.cat([greedy(model, **rows.inputs([r])) for r in range(4)])
        single_counts = []
        for r in range(4):
            logits(model, **rows.inputs([r]))
            single_counts.append(handle.stats.tokens_per_layer)
        batched = greedy(model, **rows.inputs([0, 1, 2, 3]))
        batch_counts = handle.stats.tokens_per_layer
    assert torch.equal(batched, singles)
    assert batch_counts == [[c[layer][0] for c in single_counts] for layer in range(len(batch_counts))]


@pytest.mark.parametrize("name", sorted(BOUNDARY_ONLY))
def test_boundary_equals_unpatched_on_the_shortened_video(model, rows, name):
    inputs = rows.inputs([2])
    with torch.no_grad():
        features = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"],
                                                  return_dict=True).pooler_output[0]
    with vtoken.patch(model, method_of(name), **BOUNDARY_ONLY[name]) as handle:
        out = logits(model, **inputs)
        kept = handle.stats.kept_indices[0]
        per_frame = handle.stats.tokens_per_frame[0]
    assert sum(per_frame) == out.shape[1] - (inputs["input_ids"].shape[1] - features.shape[0])
    if kept is None:
        pytest.skip("pool synthesises tokens: its layout is tested in test_baselines.py")
    ids = inputs["input_ids"][0]
    start = int((ids == VIDEO_TOKEN).nonzero()[0])
    short = torch.cat([ids[:start], torch.full((len(kept),), VIDEO_TOKEN), ids[start + features.shape[0]:]])
    embeds = model.model.get_input_embeddings()(short).clone()
    embeds[short == VIDEO_TOKEN] = features[kept]
    torch.testing.assert_close(out, logits(model, inputs_embeds=embeds[None]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(ONEVISION))
def test_cached_generate_equals_the_no_cache_loop(model, rows, name):
    inputs = rows.inputs([0, 1, 2, 3])
    prompt = inputs["input_ids"].shape[1]
    with vtoken.patch(model, method_of(name), **PRUNING[name]) as handle:
        pin_decisions(handle.config)
        with torch.no_grad():
            out = model.generate(**inputs, **GEN, return_dict_in_generate=True)
        cached = out.sequences[:, prompt:]
        ffn = decode_ffn_layers(model, handle)
        neurons = CacheLayout.of(find_cache(out)).row_state["decode_neurons"] if ffn else None
        loop, _ = no_cache_greedy(model, inputs, cached.shape[1], ffn, neurons)
    assert torch.equal(cached, loop)


@pytest.mark.parametrize("name", ["todre", "pool", "attn_topk", "dart"])
def test_sdpa_and_eager_agree(model, rows, name):
    assert_sdpa_equals_eager(model, rows.inputs([0, 1, 2, 3]), name, PRUNING[name])


def test_video_tokens_per_frame(model, rows):
    with vtoken.patch(model, "pool", keep=0.5) as handle:
        logits(model, **rows.inputs([2]))
        per_frame = handle.stats.tokens_per_frame[0]
    assert len(per_frame) == FRAMES and sum(per_frame) == handle.stats.visual_tokens_kept[0] == 7


# -- static cache + compiled decoding (the boundary methods) -----------------------------------------------------------
STATIC = {"random": dict(keep=8), "pool": dict(keep=8), "divprune": dict(keep=8), "todre": dict(keep=8, stage2=False)}


@pytest.mark.parametrize("prompts", [[0], [2]], ids=["image", "video"])
@pytest.mark.parametrize("name", sorted(STATIC))
def test_static_cache_and_compiled_decode_give_the_eager_dynamic_tokens(model, rows, name, prompts):
    """Qwen2's decoder gets one mask per layer type from a static cache; each is mapped onto the shortened prompt."""
    from test_compile import compiled_generate_config

    torch._dynamo.reset()
    batch = rows.inputs(prompts)
    with vtoken.patch(model, name, **STATIC[name]), torch.no_grad():
        eager = model.generate(**batch, **GEN)
        static = model.generate(**batch, cache_implementation="static", **GEN)
        compiled = model.generate(**batch, cache_implementation="static", compile_config=compiled_generate_config(),
                                  **GEN)
    assert torch.equal(static, eager) and torch.equal(compiled, eager)


def test_a_static_decode_step_has_no_graph_break_inside_the_decoder(model, rows):
    from test_compile import assert_a_static_step_breaks_only_around_the_base_model

    torch._dynamo.reset()
    with vtoken.patch(model, "divprune", keep=8), torch.no_grad():
        out = model.generate(**rows.inputs([2]), cache_implementation="static", return_dict_in_generate=True,
                             **dict(GEN, max_new_tokens=2))
        assert_a_static_step_breaks_only_around_the_base_model(model, out, "modeling_qwen2")

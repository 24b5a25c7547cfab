"""The invariants of docs/design.md for every LLaVA-side method, on tiny random-weight LLaVA, LLaVA-NeXT,
LLaVA-OneVision (images; OneVision's videos are in test_llava_onevision.py) and InternVL (images of several tiles)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from tiny_models import (
    EOS,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    left_pad,
    prompt,
    tiny_internvl,
    tiny_llava,
    tiny_llava_next,
    tiny_llava_onevision,
    visual_count,
)

import vtoken
from vtoken.adapters._compat import find_cache
from vtoken.adapters.vlm.cache import CacheLayout
from vtoken.methods.base import Reduction
from vtoken.methods.tokenflex import TokenFlexProjector


def seeded_projector() -> TokenFlexProjector:
    """A TokenFLEX projector for the tiny models (32-wide vision, 64-wide LLM), the same in every run."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TokenFlexProjector(32, 64)


# random weights may emit a placeholder id, which would add an image (or a OneVision video) without pixels
SUPPRESS = [IMAGE_TOKEN, VIDEO_TOKEN]
KEEP_ALL = {
    "todre": dict(keep=1.0, tau=0.0),  # tau=0: stage 2 scores but never fires
    "divprune": dict(keep=1.0),
    "random": dict(keep=1.0),
    "pool": dict(keep=1.0),
    "attn_topk": dict(keep=1.0),
    "transprune": dict(keep=1.0),
    "corematching": dict(keep=1.0, beta=1.0),  # beta=1: every neuron is a core neuron, decode stays dense
    "pyramiddrop": dict(keep=1.0),
    "dart": dict(keep=1.0),
    "cdpruner": dict(keep=1.0),
}
PRUNING = {
    "todre": dict(keep=0.25),
    "todre_stage2_fires": dict(keep=0.25, tau=1.0),
    "todre_maxmin": dict(keep=0.25, rule="maxmin"),
    "divprune": dict(keep=0.25),
    "random": dict(keep=0.25),
    "pool": dict(keep=0.25),
    "attn_topk": dict(keep=0.3),
    "transprune": dict(keep=0.25),
    "transprune_ttv_paper": dict(keep=0.25, iga=False, direction="paper"),
    "corematching": dict(),  # adaptive threshold, decode FFN sparsity in the default layers
    "corematching_keep": dict(keep=0.3, ffn_layers="all"),
    "pyramiddrop": dict(keep=0.25),
    "pyramiddrop_layers": dict(keep=10, layers=(1, 3)),
    "dart": dict(keep=0.25),
    "dart_layer1": dict(keep=0.25, layer=1, text_pivots=2),
    "cdpruner": dict(keep=0.25),
    "cdpruner_similar": dict(keep=0.25, relevance="similar"),
    "visionzip": dict(keep=0.25),  # keep-all: test_visionzip.py (LLaVA-NeXT and OneVision drop separators)
    # TokenFLEX takes a token count per view, not a keep budget: 9 = 3 x 3 pools both tiny grids (8 x 8 and
    # LLaVA-NeXT's 4 x 4 views); its keep-all case (N = the native grid) is in test_tokenflex.py
    "tokenflex": dict(num_tokens=9),
    "tokenflex_trained": dict(num_tokens=9, projector=seeded_projector()),
}
BOUNDARY_ONLY = {
    "todre": dict(keep=0.25, stage2=False),
    "todre_maxmin": dict(keep=0.25, stage2=False, rule="maxmin"),
    "divprune": dict(keep=0.25),
    "random": dict(keep=0.25),
    "pool": dict(keep=0.25),
    "cdpruner": dict(keep=0.25),
}


def method_of(name: str) -> str:
    while name not in vtoken.methods():  # a variant's name: the method's, then "_what_differs"
        name = name.rsplit("_", 1)[0]
    return name


class Host:
    """A tiny model plus a few inputs of different sizes (LLaVA-NeXT, OneVision: different token counts per image;
    OneVision's first image is large enough for its grid to be scaled down)."""

    def __init__(self, name: str, attn: str = "sdpa"):
        self.name = name
        torch.manual_seed(1)
        if name == "llava":
            self.model = tiny_llava(attn)
            self.pixels = [torch.randn(1, 3, 112, 112) for _ in range(3)]
            self.sizes = [None] * 3
        elif name == "llava_next":
            self.model = tiny_llava_next(attn)
            self.sizes = [torch.tensor([[112, 84]]), torch.tensor([[56, 56]]), torch.tensor([[84, 112]])]
            self.pixels = [torch.randn(1, 5, 3, 56, 56) for _ in range(3)]
        elif name == "llava_onevision":
            self.model = tiny_llava_onevision(attn)
            self.sizes = [torch.tensor([[168, 140]]), torch.tensor([[56, 56]]), torch.tensor([[84, 112]])]
            self.pixels = [torch.randn(1, 10, 3, 56, 56) for _ in range(3)]
        else:  # InternVL: an image is its tiles, reduced under one budget (the first image has one tile)
            self.model = tiny_internvl(attn)
            self.sizes = [None] * 3
            self.pixels = [torch.randn(tiles, 3, 112, 112) for tiles in (1, 3, 2)]
        self.counts = [sum(visual_count(self.model, p, s)) for p, s in zip(self.pixels, self.sizes)]
        # different prompt lengths too, so the batch is left-padded
        self.rows = [prompt(c, after=(7, 8, 9, 10)[: 2 + i]) for i, c in enumerate(self.counts)]

    def single(self, i: int) -> dict:
        ids = self.rows[i].unsqueeze(0)
        out = dict(input_ids=ids, pixel_values=self.pixels[i], attention_mask=torch.ones_like(ids))
        if self.sizes[i] is not None:
            out["image_sizes"] = self.sizes[i]
        return out

    def batch(self) -> dict:
        ids, mask = left_pad(self.rows)
        out = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(self.pixels))
        if self.sizes[0] is not None:
            out["image_sizes"] = torch.cat(self.sizes)
        return out


@pytest.fixture(scope="module", params=["llava", "llava_next", "llava_onevision", "internvl"])
def host(request):
    return Host(request.param)


def logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, n: int = 5, **inputs) -> torch.Tensor:
    """The ``n`` tokens generated after the prompt, right-padded with the pad id (0) when every row stopped early at
    EOS, as a batch pads a row that finished before the others."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0, suppress_tokens=SUPPRESS)
    new = out[:, inputs["input_ids"].shape[1]:] if inputs.get("input_ids") is not None else out
    return F.pad(new, (0, n - new.shape[1]), value=0)


# 1. keep-all is lossless ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(KEEP_ALL))
def test_keep_all_is_lossless(host, name):
    inputs = host.single(0)
    ref, ref_tokens = logits(host.model, **inputs), greedy(host.model, **inputs)
    with vtoken.patch(host.model, name, **KEEP_ALL[name]) as handle:
        out, tokens = logits(host.model, **inputs), greedy(host.model, **inputs)
        assert handle.stats.visual_tokens_llm == [host.counts[0]]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


# 2. remove() restores ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["todre", "divprune", "attn_topk", "pool", "transprune", "corematching",
                                  "tokenflex_trained"])
def test_remove_restores_and_repatch_repeats(host, name):
    inputs = host.single(1)
    ref, ref_tokens = logits(host.model, **inputs), greedy(host.model, **inputs)
    weights = {k: v.clone() for k, v in host.model.state_dict().items()}
    handle = vtoken.patch(host.model, method_of(name), **PRUNING[name])
    first, first_tokens = logits(host.model, **inputs), greedy(host.model, **inputs)  # decode steps included
    assert first.shape[1] < ref.shape[1]
    handle.remove()
    handle.remove()  # idempotent
    assert torch.equal(logits(host.model, **inputs), ref)
    assert torch.equal(greedy(host.model, **inputs), ref_tokens)
    assert not host.model.model._forward_pre_hooks and not host.model.model._forward_hooks
    layers = host.model.model.language_model.layers
    assert all(not layer._forward_pre_hooks for layer in layers)
    assert all(not m._forward_hooks for layer in layers for m in layer.modules())  # sub-layer observers
    assert all("forward" not in m.__dict__ for layer in layers for m in layer.modules())  # decode FFNs
    assert "get_image_features" not in host.model.model.__dict__
    after = host.model.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], v) for k, v in weights.items())  # bit-exact
    with vtoken.patch(host.model, method_of(name), **PRUNING[name]):
        assert torch.equal(logits(host.model, **inputs), first)
        assert torch.equal(greedy(host.model, **inputs), first_tokens)
    assert torch.equal(logits(host.model, **inputs), ref)


# 3. boundary pruning == the unpatched model on the manually shortened input -----------------------------------------
def manual_pool(features: torch.Tensor, keep: float) -> torch.Tensor:
    """Independent re-derivation of ``pool`` for the single-segment LLaVA layout (8x8 grid)."""
    grid = features.view(8, 8, -1).permute(2, 0, 1)
    side = round((keep * 64) ** 0.5)
    return F.adaptive_avg_pool2d(grid, (side, side)).flatten(1).T


@pytest.mark.parametrize("name", sorted(BOUNDARY_ONLY))
def test_boundary_equals_unpatched_on_shortened_input(host, name):
    model, inputs = host.model, host.single(0)
    with torch.no_grad():
        kw = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True, **kw)
        features = features.pooler_output[0]
    with vtoken.patch(model, method_of(name), **BOUNDARY_ONLY[name]) as handle:
        out = logits(model, **inputs)
        kept = handle.stats.kept_indices[0]
    if kept is not None:
        reduced = features[kept]
    elif host.name == "llava":
        reduced = manual_pool(features, 0.25)
    else:
        pytest.skip("pool on the AnyRes layout is checked against its own layout test")
    ids = inputs["input_ids"][0]
    start = int((ids == IMAGE_TOKEN).nonzero()[0])
    short = torch.cat([ids[:start], torch.full((reduced.shape[0],), IMAGE_TOKEN), ids[start + features.shape[0]:]])
    embeds = model.model.get_input_embeddings()(short).clone()
    embeds[short == IMAGE_TOKEN] = reduced
    expected = logits(model, inputs_embeds=embeds.unsqueeze(0))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


# 4. batch of 3 (left-padded, different lengths) == 3 single runs --------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(PRUNING))
def test_batch_equals_singles(host, name, attn):
    model = host.model
    llm = model.model.language_model  # the vision tower keeps SDPA: a discrete selection may flip at near-ties
    llm.set_attn_implementation(attn)
    try:
        with vtoken.patch(model, method_of(name), **PRUNING[name]) as handle:
            singles = torch.cat([greedy(model, **host.single(i)) for i in range(3)])
            single_counts = []
            for i in range(3):
                logits(model, **host.single(i))
                single_counts.append(handle.stats.tokens_per_layer)
            batched = greedy(model, **host.batch())
            batch_counts = handle.stats.tokens_per_layer
            single_last = [logits(model, **host.single(i))[:, -1] for i in range(3)]
            batch_last = logits(model, **host.batch())[:, -1]
    finally:
        llm.set_attn_implementation("sdpa")
    assert torch.equal(batched, singles)
    # every sample keeps the same number of real tokens at every layer as when it runs alone
    assert batch_counts == [[c[layer][0] for c in single_counts] for layer in range(len(batch_counts))]
    torch.testing.assert_close(batch_last, torch.cat(single_last), atol=1e-4, rtol=1e-4)


# 5. generate() with cache == step-by-step forward without cache --------------------------------------------------
def pin_decisions(config) -> None:
    """Make in-LLM decisions of a re-run equal to the first prefill's, extended to tokens appended later.

    Without a cache every step re-runs prefill on prompt + generated tokens, and score-based rules would see a
    different last token. Pinning isolates what this test is about: the pruned sequence and its cache.
    """
    if getattr(config, "conditioned", False):  # a boundary choice that reads the prompt's text (CDPruner): the loop's
        reduce_batch, first = config.reduce_batch, {}  # prompts grow by the generated tokens, its question does not

        def pinned_batch(images):  # one call per modality of a prefill: pinned by what it reduces
            key = tuple((ctx.modality, f.shape[0]) for f, ctx in images)
            kept = first.get(key) or first.setdefault(key, [r.kept for r in reduce_batch(images)])
            return [Reduction(f, None) if k is None else Reduction(f.index_select(0, k), k)
                    for (f, _), k in zip(images, kept)]

        config.reduce_batch = pinned_batch
    if not hasattr(config, "prune"):  # no in-LLM decisions to pin (TokenFLEX)
        return
    decide, memo = config.prune, {}

    def pinned(ctx):
        first = memo.setdefault(ctx.layer, decide(ctx))
        ctx.kept = None  # the pinned mask is not the one decide counted: the adapter counts it
        extra = torch.ones(first.shape[0], ctx.valid.shape[1] - first.shape[1], dtype=torch.bool)
        return torch.cat([first, extra], dim=1)

    config.prune = pinned
    # what a method asks for once prefill is over (CoreMatching's decode neurons) is pinned the same way
    after, outcome = config.after_prefill, {}

    def pinned_after(state):
        if "first" not in outcome:
            outcome["first"] = after(state)
        return outcome["first"]

    config.after_prefill = pinned_after


def decode_ffn_layers(model, handle) -> tuple[int, ...]:
    """Layers whose MLP runs only the prefill's core neurons in single-token steps (CoreMatching), else ()."""
    layers = getattr(handle.config, "decode_ffn_layers", None)  # a feature provider (tokenflex) has none
    return () if layers is None else layers(len(model.model.language_model.layers))


@contextmanager
def sparse_ffn_reference(model, layers: tuple[int, ...], neurons: torch.Tensor, columns):
    """The meaning of decode FFN sparsity, written independently of vtoken's sliced weights, for a forward without
    cache: in every layer of ``layers`` the MLP rows ``columns(length)`` (the tokens that a cached run fed as
    single-token steps) keep only the ``neurons`` (B, len(layers), k) of their row; other neurons are zeroed."""

    def hook(index):
        def replace(mlp, args, out):
            x = args[0]
            cols = torch.as_tensor(columns(x.shape[1]), dtype=torch.long)
            if x.shape[1] == 1 or cols.numel() == 0:
                return None
            hidden = mlp.act_fn(mlp.gate_proj(x[:, cols])) * mlp.up_proj(x[:, cols])
            keep = torch.zeros(x.shape[0], hidden.shape[-1]).scatter_(1, neurons[:, index], 1.0)
            out = out.clone()
            down = mlp.down_proj  # its weights, not its call: vtoken observes that call during prefill
            out[:, cols] = F.linear(hidden * keep.unsqueeze(1), down.weight, down.bias)
            return out

        return replace

    mlps = model.model.language_model.layers
    hooks = [mlps[i].mlp.register_forward_hook(hook(j)) for j, i in enumerate(layers)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", sorted(PRUNING))
def test_cached_generate_equals_no_cache_loop(host, name):
    """With decode FFN sparsity (CoreMatching), the cached run's single-token steps compute only the core neurons;
    the loop without cache has no such steps, so its rows of generated tokens get the same neurons through an
    independent zero-masking reference (``sparse_ffn_reference``), prompt rows stay dense in both."""
    model = host.model
    inputs = host.batch()
    with vtoken.patch(model, method_of(name), **PRUNING[name]) as handle:
        pin_decisions(handle.config)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                 suppress_tokens=SUPPRESS, return_dict_in_generate=True)
        cached = out.sequences[:, inputs["input_ids"].shape[1]:]  # fewer than 5 once every row has stopped
        ffn = decode_ffn_layers(model, handle)
        layout = CacheLayout.of(find_cache(out))
        assert bool(ffn) == (layout is not None and layout.row_state is not None)
        neurons = layout.row_state["decode_neurons"] if ffn else None
        loop, done = no_cache_greedy(model, inputs, cached.shape[1], ffn, neurons)
    assert torch.equal(cached, loop)
    assert cached.shape[1] == 5 or bool(done.all())  # generate() stops early only when every row has finished


def no_cache_greedy(model, inputs: dict, steps: int, ffn: tuple[int, ...], neurons, suppress=SUPPRESS,
                    growing: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding without a cache, one forward of the whole sequence per token, as generate() picks and pads
    them; the rows of generated tokens get decode FFN sparsity from ``sparse_ffn_reference``. ``growing``: other
    per-column inputs, extended with a 0 per generated token (Qwen's ``mm_token_type_ids``). Returns the (B, steps)
    tokens and which rows emitted EOS."""
    columns = {k: inputs[k] for k in ("input_ids", "attention_mask", *growing)}
    extra = {k: v for k, v in inputs.items() if k not in columns}
    made, done = [], torch.zeros(columns["input_ids"].shape[0], 1, dtype=torch.bool)
    generated = lambda length: range(length - len(made), length)  # noqa: E731  (rows of generated tokens)
    for _ in range(steps):
        with torch.no_grad(), sparse_ffn_reference(model, ffn, neurons, generated):
            last = model(**columns, use_cache=False, **extra).logits[:, -1]
        nxt, done = next_greedy(last, done, suppress)
        made.append(nxt)
        columns["input_ids"] = torch.cat([columns["input_ids"], nxt], 1)
        columns["attention_mask"] = torch.cat([columns["attention_mask"], torch.ones_like(nxt)], 1)
        for name in growing:
            columns[name] = torch.cat([columns[name], torch.zeros_like(nxt).to(columns[name].dtype)], 1)
    return torch.cat(made, 1), done


def next_greedy(logits: torch.Tensor, done: torch.Tensor, suppress=SUPPRESS) -> tuple[torch.Tensor, torch.Tensor]:
    """What generate() appends for the last positions' ``logits`` (B, V): the greedy token with the ``suppress``ed
    ids (placeholders) excluded, or the pad id (0) in rows that already emitted EOS (``done``, (B, 1), updated)."""
    logits = logits.clone()
    logits[:, suppress] = float("-inf")
    nxt = torch.where(done, 0, logits.argmax(-1, keepdim=True))
    return nxt, done | (nxt == EOS)


# 6. SDPA and eager agree -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRUNING))
def test_sdpa_and_eager_agree(host, name):
    assert_sdpa_equals_eager(host.model, host.batch(), method_of(name), PRUNING[name])


def assert_sdpa_equals_eager(model, inputs: dict, method: str, config: dict) -> None:
    """The patched model's logits with the LLM on SDPA equal those on eager attention, on every real token."""
    with vtoken.patch(model, method, **config) as handle:
        sdpa = logits(model, **inputs)
        # only the LLM switches: the vision tower's ~1e-7 differences could flip a greedy selection at a near-tie
        model.model.language_model.set_attn_implementation("eager")
        try:
            eager = logits(model, **inputs)
        finally:
            model.model.language_model.set_attn_implementation("sdpa")
        real = handle.stats.tokens_per_layer[-1]  # padding and filler rows sit on the left and mean nothing
    for row, n in enumerate(real):
        torch.testing.assert_close(sdpa[row, -n:], eager[row, -n:], atol=1e-4, rtol=1e-4)


# inputs without images are untouched ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRUNING))
def test_text_only_input_is_a_no_op(host, name):
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    ref, ref_tokens = logits(host.model, input_ids=ids), greedy(host.model, input_ids=ids, attention_mask=mask)
    with vtoken.patch(host.model, method_of(name), **PRUNING[name]):
        assert torch.equal(logits(host.model, input_ids=ids), ref)
        assert torch.equal(greedy(host.model, input_ids=ids, attention_mask=mask), ref_tokens)


# beam search / several sequences per prompt: generate() repeats the image features itself ---------------------------
@pytest.mark.parametrize("name", ["todre", "divprune", "random"])
def test_beam_search_equals_unpatched_beam_search_on_the_shortened_input(host, name):
    model, inputs = host.model, host.single(0)
    beams = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0,
                 suppress_tokens=SUPPRESS)
    with torch.no_grad():
        kw = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True, **kw)
        features = features.pooler_output[0]
    with vtoken.patch(model, method_of(name), **BOUNDARY_ONLY[name]) as handle, torch.no_grad():
        pruned = model.generate(**inputs, **beams)[:, -4:]
        kept = handle.stats.kept_indices[0]
    ids = inputs["input_ids"][0]
    start = int((ids == IMAGE_TOKEN).nonzero()[0])
    short = torch.cat([ids[:start], torch.full((len(kept),), IMAGE_TOKEN), ids[start + features.shape[0]:]])
    embeds = model.model.get_input_embeddings()(short).clone()
    embeds[short == IMAGE_TOKEN] = features[kept]
    with torch.no_grad():
        expected = model.generate(inputs_embeds=embeds.unsqueeze(0), attention_mask=torch.ones(1, len(short),
                                  dtype=torch.long), **beams)[:, -4:]
    assert torch.equal(pruned, expected)


def answers(sequences: torch.Tensor, prompt_width: int) -> list[list[int]]:
    """The tokens each row generated, up to and including its first EOS (a finished row is padded after it, and a
    single run whose every beam finished stops early)."""
    out = []
    for row in sequences[:, prompt_width:].tolist():
        out.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return out


@pytest.mark.parametrize("name", sorted(PRUNING))
def test_beam_search_batch_equals_singles(host, name):
    model = host.model
    beams = dict(max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0, suppress_tokens=SUPPRESS)
    with vtoken.patch(model, method_of(name), **PRUNING[name]), torch.no_grad():
        singles = [answers(model.generate(**host.single(i), **beams), len(host.rows[i]))[0] for i in range(3)]
        batch = host.batch()
        batched = answers(model.generate(**batch, **beams), batch["input_ids"].shape[1])
    assert batched == singles

"""SVG2 on tiny random-weight diffusers video DiTs: exactness, reversibility, denoising state, CFG branches."""

import math

import pytest
import torch
from svg2_utils import one_thread  # noqa: F401  (autouse fixture)

import vtoken
import vtoken.methods.svg2 as svg2_method

diffusers = pytest.importorskip("diffusers")

SMALL = dict(q_clusters=8, k_clusters=16, kmeans_init_iters=4, kmeans_step_iters=1, dense_steps=0, dense_layers=0)


def tiny_wan(layers=2):
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()


def wan_inputs(batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 16, 3, 32, 32, generator=gen),  # 3 x 16 x 16 = 768 tokens
        encoder_hidden_states=torch.randn(batch, 12, 32, generator=gen),
    )


def run(model, t=500, **inputs):
    with torch.no_grad():
        return model(timestep=torch.tensor([t] * inputs["hidden_states"].shape[0]), **inputs).sample


def tiny_hunyuan():
    torch.manual_seed(0)
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), image_condition_type=None,
    ).eval()


def hunyuan_call(model, t=500.0):
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(1, 12)
    mask[:, 7:] = 0  # 7 prompt tokens, 5 padding
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(1, 4, 3, 16, 16, generator=gen), timestep=torch.tensor([t]),
            encoder_hidden_states=torch.randn(1, 12, 16, generator=gen), encoder_attention_mask=mask,
            pooled_projections=torch.randn(1, 8, generator=gen), guidance=torch.tensor([3000.0]),
        ).sample


# -- Wan -----------------------------------------------------------------------------------------------------------


def test_wan_top_p_one_equals_dense():
    model, inputs = tiny_wan(), wan_inputs()
    dense = run(model, **inputs)
    with vtoken.patch(model, "svg2", top_p=1.0, **SMALL) as handle:
        out = run(model, **inputs)
        assert handle.stats.last.density == pytest.approx(1.0)
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)


def test_wan_sparse_call_records_stats_and_remove_restores_exactly():
    model, inputs = tiny_wan(), wan_inputs()
    originals = {name: p for name, p in model.attn_processors.items()}
    dense = run(model, **inputs)
    handle = vtoken.patch(model, "svg2", top_p=0.5, **SMALL)
    assert type(model.blocks[0].attn1.processor).__name__ == "SVG2WanProcessor"
    assert model.blocks[0].attn2.processor is originals["blocks.0.attn2.processor"]  # cross-attention untouched
    sparse = run(model, **inputs)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, dense, atol=1e-3)
    stats = handle.stats
    assert [c.layer for c in stats.calls] == [0, 1] and not any(c.dense for c in stats.calls)
    last = stats.last
    assert 0 < last.density < 1 and last.tokens == 768
    assert last.kmeans_ms > 0 and last.plan_ms > 0 and last.attention_ms > 0
    totals = stats.totals()
    assert totals["sparse_calls"] == 2 and 0 < totals["mean_sparse_density"] < 1
    with pytest.raises(ValueError, match="already patched with 'svg2'"):
        vtoken.patch(model, "svg2")
    handle.remove()
    assert model.attn_processors == originals
    assert torch.equal(run(model, **inputs), dense)
    with vtoken.patch(model, "svg2", top_p=0.5, **SMALL):  # patch / remove / patch
        torch.testing.assert_close(run(model, **inputs), sparse)


def test_wan_dense_warmup_steps_and_layers_are_exact():
    model, inputs = tiny_wan(), wan_inputs()
    dense = {t: run(model, t=t, **inputs) for t in (900, 800)}
    with vtoken.patch(model, "svg2", top_p=0.3, **{**SMALL, "dense_steps": 1}) as handle:
        assert torch.equal(run(model, t=900, **inputs), dense[900])  # step 0: original processors
        assert not torch.allclose(run(model, t=800, **inputs), dense[800], atol=1e-3)  # step 1: sparse
        assert [(c.step, c.dense) for c in handle.stats.calls] == [(0, True), (0, True), (1, False), (1, False)]
    with vtoken.patch(model, "svg2", top_p=0.3, **{**SMALL, "dense_layers": 2}):
        assert torch.equal(run(model, t=800, **inputs), dense[800])


def test_wan_batch_equals_single_samples():
    model = tiny_wan()
    a, b = wan_inputs(seed=1), wan_inputs(seed=2)
    both = {k: torch.cat([a[k], b[k]]) for k in a}
    with vtoken.patch(model, "svg2", top_p=0.7, **SMALL) as handle:
        batched = run(model, **both)
        singles = []
        for inputs in (a, b):
            handle.reset()
            singles.append(run(model, **inputs))
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-4, atol=1e-4)


def count_kmeans_assignments(monkeypatch):
    calls = []
    original = svg2_method.kmeans_step

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(svg2_method, "kmeans_step", counting)
    return calls


def test_wan_pipeline_loop_keeps_cfg_branches_apart_and_resets_per_generation(monkeypatch):
    model = tiny_wan()
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    call = dict(prompt_embeds=torch.randn(1, 12, 32, generator=gen), negative_prompt_embeds=torch.randn(1, 12, 32),
                height=256, width=256, num_frames=9, num_inference_steps=3, guidance_scale=5.0, output_type="latent")
    dense = pipe(**call, generator=torch.Generator().manual_seed(1)).frames
    assignments = count_kmeans_assignments(monkeypatch)
    handle = vtoken.patch(pipe, "svg2", top_p=0.8, **{**SMALL, "dense_steps": 1})
    assert handle.host == "wan"
    out = pipe(**call, generator=torch.Generator().manual_seed(1)).frames
    assert out.shape == dense.shape and torch.isfinite(out).all() and not torch.equal(out, dense)
    runtime_caches = handle.model.transformer.blocks[0].attn1.processor.runtime.caches
    assert set(runtime_caches) == {(0, layer, branch) for layer in (0, 1) for branch in ("cond", "uncond")}
    # layer 0's self-attention sees no text yet (cross-attention follows it); layer 1's branches differ
    assert not torch.equal(runtime_caches[(0, 1, "cond")][1], runtime_caches[(0, 1, "uncond")][1])
    calls = handle.stats.calls
    assert [(c.step, c.branch) for c in calls if c.layer == 0] == [
        (0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond"), (2, "cond"), (2, "uncond")]
    # step 1: every (layer, branch) starts from a seeded init (4 iterations on Q and on K); step 2 warm-starts (1).
    # Sharing the cache across branches would have let "uncond" warm-start from "cond" in step 1 (28 in all).
    assert len(assignments) == 2 * 2 * 2 * 4 + 2 * 2 * 2 * 1
    assignments.clear()
    again = pipe(**call, generator=torch.Generator().manual_seed(1)).frames  # a new generation: caches dropped
    assert len(assignments) == 40 and handle.stats.generations == 2 and len(handle.stats.history) == 1
    torch.testing.assert_close(again, out)
    handle.remove()
    assert "check_inputs" not in pipe.__dict__ and "cache_context" not in model.__dict__
    torch.testing.assert_close(pipe(**call, generator=torch.Generator().manual_seed(1)).frames, dense)


def test_wan_manual_loop_branches_by_call_order_and_reset():
    model, inputs = tiny_wan(), wan_inputs()
    with vtoken.patch(model, "svg2", top_p=0.5, **SMALL) as handle:
        runtime = model.blocks[1].attn1.processor.runtime
        for t in (900, 900, 700, 700):
            run(model, t=t, **inputs)
        assert [(c.step, c.branch) for c in handle.stats.calls if c.layer == 1] == [
            (0, "0"), (0, "1"), (1, "0"), (1, "1")]
        assert len(runtime.caches) == 4
        run(model, t=950, **inputs)  # the timestep went back up: a new generation
        assert handle.stats.generations == 1 and len(runtime.caches) == 2 and runtime.step == 0
        handle.reset()
        assert runtime.caches == {} and handle.stats.calls == []


def test_wan_errors_for_bad_arguments():
    model, inputs = tiny_wan(), wan_inputs()
    with pytest.raises(ValueError, match="top_p=1.5 is out of range"):
        vtoken.patch(model, "svg2", top_p=1.5)
    with pytest.raises(ValueError, match="unknown argument.*'keep'"):
        vtoken.patch(model, "svg2", keep=0.5)
    with vtoken.patch(model, "svg2", **{**SMALL, "q_clusters": 1000, "dense_steps": 5}):
        with pytest.raises(ValueError, match="q_clusters=1000 is larger than the 768 tokens"):
            run(model, **inputs)  # caught in a dense warm-up step already
    with pytest.raises(ValueError, match="does not support"):
        vtoken.patch(torch.nn.Linear(2, 2), "svg2")


def test_wan_attention_backend_setting_reaches_the_original_processor():
    model = tiny_wan()
    original = model.blocks[0].attn1.processor
    with vtoken.patch(model, "svg2", **SMALL):
        model.blocks[0].attn1.set_attention_backend("_native_math")
        assert str(original._attention_backend.value) == "_native_math"


def test_wan_triton_backend_under_the_interpreter_equals_dense():
    model, inputs = tiny_wan(layers=1), wan_inputs()
    dense = run(model, **inputs)
    with vtoken.patch(model, "svg2", top_p=1.0, backend="triton", **{**SMALL, "kmeans_init_iters": 2}):
        out = run(model, **inputs)
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)


def test_wan_sparse_calls_read_only_the_timestep_from_the_device_and_their_stats_when_looked_at():
    """On a GPU a read stalls the host until the device drains: the Triton path reads the timestep once per
    transformer call (the host decides the step from it) and nothing per attention call, stats included."""
    from vtoken.evals.bench.overhead import OpCounter

    model, inputs = tiny_wan(), wan_inputs()
    with vtoken.patch(model, "svg2", top_p=0.5, backend="triton", **SMALL) as handle:
        for step, t in enumerate((900, 800)):
            with OpCounter(model) as counter:
                run(model, t=t, **inputs)
            sites = counter.segments[0].sites
            assert dict(sites) == {next(iter(sites)): 1} and "_timestep_value" in next(iter(sites))
            assert len(handle.stats._unread) == 2 * (step + 1)  # every sparse call so far, not yet read
        calls = handle.stats.calls
    assert not handle.stats._unread and len(calls) == 4
    assert all(0 < c.density < 1 and c.kmeans_ms > 0 and c.attention_ms > 0 for c in calls)


# -- HunyuanVideo ---------------------------------------------------------------------------------------------------


def test_hunyuan_top_p_one_equals_dense_with_padded_text():
    model = tiny_hunyuan()
    dense = hunyuan_call(model)
    refiner = model.context_embedder.token_refiner.refiner_blocks[0].attn.processor
    with vtoken.patch(model, "svg2", top_p=1.0, **SMALL) as handle:
        assert model.context_embedder.token_refiner.refiner_blocks[0].attn.processor is refiner
        out = hunyuan_call(model)
        assert [c.layer for c in handle.stats.calls] == [0, 1]
        assert handle.stats.last.density == pytest.approx(1.0)
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)
    assert torch.equal(hunyuan_call(model), dense)


def test_hunyuan_sparse_runs_and_counts_text_in_density():
    model = tiny_hunyuan()
    dense = hunyuan_call(model)
    with vtoken.patch(model, "svg2", top_p=0.3, **SMALL) as handle:
        out = hunyuan_call(model)
        last = handle.stats.last
    assert torch.isfinite(out).all() and not torch.allclose(out, dense, atol=1e-3)
    assert last.tokens == 768 + 12 and 0 < last.density < 1


def test_hunyuan_checks_its_video_keys_once_per_transformer_call_not_once_per_layer():
    """Every layer of a call gets the same key mask: its video part is read once (on a GPU each read stalls the host),
    beside the timestep."""
    from vtoken.evals.bench.overhead import OpCounter

    model = tiny_hunyuan()
    with vtoken.patch(model, "svg2", top_p=0.5, **SMALL) as handle:
        for t in (900.0, 800.0):
            with OpCounter(model) as counter:
                hunyuan_call(model, t)
            sites = {site.split(" ")[-1]: n for site, n in counter.segments[0].sites.items()}
            assert {k: v for k, v in sites.items() if "reference" not in k} == {
                "_timestep_value": 1, "_video_keys_valid": 1}
        assert [c.dense for c in handle.stats.calls] == [False] * 4  # 2 layers x 2 calls


@pytest.mark.parametrize("inference", [False, True])
def test_a_call_whose_video_keys_are_masked_stays_dense_also_after_an_in_place_change(inference):
    from vtoken.adapters.bridges.dit_svg2 import SVG2Runtime

    runtime = SVG2Runtime(svg2_method.SVG2Config(**SMALL))
    runtime.begin_call(900.0)
    with torch.inference_mode(inference):
        mask = torch.ones(1, 1, 1, 40 + 8, dtype=torch.bool)
        mask[..., 44:] = False  # padded text keys are a layout SVG2 knows
        assert [runtime.begin_attention(layer, 40, video_mask=mask) for layer in (0, 1)] == ["sparse"] * 2
        mask[..., 3] = False  # a masked video key: the original processor's call
        if inference:  # an inference tensor has no version counter: a new tensor is a new check
            mask = mask.clone()
        assert runtime.begin_attention(2, 40, video_mask=mask) == "dense"
        assert runtime.begin_attention(3, 40, video_mask=torch.ones(1, 1, 1, 48, dtype=torch.bool)) == "sparse"
        assert runtime.begin_attention(4, 40, eligible=False) == "dense"
    assert [(c.layer, c.dense) for c in runtime.stats.calls] == [(2, True), (4, True)]  # sparse calls record later


@pytest.mark.parametrize("factory,counts", [(tiny_wan, (300, 1000)), (tiny_hunyuan, (400, 1000))])
def test_cluster_counts_default_to_the_official_scripts_per_model(factory, counts):
    model = factory()
    with vtoken.patch(model, "svg2") as handle:
        assert (handle.config.q_clusters, handle.config.k_clusters) == counts
    with vtoken.patch(model, "svg2", k_clusters=24) as handle:  # a count the user sets stays
        assert (handle.config.q_clusters, handle.config.k_clusters) == (counts[0], 24)


def test_model_default_counts_larger_than_a_tiny_video_fail_naming_the_argument():
    model, inputs = tiny_wan(), wan_inputs()
    with vtoken.patch(model, "svg2", q_clusters=8), pytest.raises(
            ValueError, match="k_clusters=1000 is larger than the 768 tokens"):
        run(model, **inputs)


# -- torch.compile ---------------------------------------------------------------------------------------------------


def wan_step(model, t):
    return run(model, t=t, **wan_inputs())


def compiled_transformer(model, how: str, **options):
    """``model`` compiled whole (``torch.compile``) or block by block (diffusers' ``compile_repeated_blocks``)."""
    if how == "whole":
        return torch.compile(model, backend="eager", **options)
    model.compile_repeated_blocks(backend="eager", **options)
    return model


@pytest.mark.parametrize("how", ["whole", "regional"])
@pytest.mark.parametrize("host", ["wan", "hunyuan"])
def test_a_compiled_transformer_gives_the_eager_outputs_and_stats_over_denoising_steps(host, how):
    """Traced by Dynamo, the centroid-cache lookup of a layer that missed on the first step stayed a miss on every
    later one, so each compiled step restarted its k-means cold: the steps after the first differed from eager. The
    host's bookkeeping now runs outside the graphs. Each step runs two CFG branches; the first step is dense, the
    second clusters cold and the third warm. Compiled whole or, as diffusers recommends for video DiTs, block by
    block."""
    model, call = (tiny_wan(), wan_step) if host == "wan" else (tiny_hunyuan(), hunyuan_call)
    config = dict(top_p=0.5, **{**SMALL, "dense_steps": 1})
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        with vtoken.patch(model, "svg2", **config) as handle:
            forward = compiled_transformer(model, how) if compiled else model
            outs = [call(forward, t) for t in (900, 900, 800, 800, 700, 700)]
            runs[compiled] = outs, list(handle.stats.calls)
    torch._dynamo.reset()
    (eager, eager_calls), (traced, traced_calls) = runs[False], runs[True]
    for a, b in zip(eager, traced):
        torch.testing.assert_close(b, a)
    fields = lambda c: (c.layer, c.step, c.branch, c.dense, c.tokens, round(c.density, 6))  # noqa: E731
    assert [fields(c) for c in traced_calls] == [fields(c) for c in eager_calls]
    assert sum(not c.dense for c in traced_calls) == 8  # 2 layers x 2 branches x 2 sparse steps
    sparse = [c for c in traced_calls if not c.dense]
    assert all(math.isnan(c.kmeans_ms) for c in sparse)  # inside a graph a stage has no time of its own
    assert all(c.kmeans_ms > 0 for c in eager_calls if not c.dense)


@pytest.mark.parametrize("how", ["whole", "regional"])
def test_fullgraph_compilation_fails_saying_why_and_what_to_do(how):
    """The host's bookkeeping splits the graph at every attention call, so ``fullgraph=True`` cannot hold; Dynamo's
    error carries vtoken's reason rather than only its own "Skip inlining a disabled function"."""
    model = tiny_wan()
    torch._dynamo.reset()
    with vtoken.patch(model, "svg2", top_p=0.5, **SMALL), pytest.raises(
            torch._dynamo.exc.Unsupported, match=r"SVG2 keeps the denoising step.*compile_repeated_blocks\(\)"):
        wan_step(compiled_transformer(model, how, fullgraph=True), 900)
    torch._dynamo.reset()

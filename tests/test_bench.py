"""The benchmark machinery on a tiny model: one run, dense first, consistent counts and FLOPs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import tiny_llava, tiny_llava_next

import vtoken
from vtoken.adapters import _compat
from vtoken.cli import main
from vtoken.evals.bench.flops import decoder_layer_flops
from vtoken.evals.bench.llava import (
    EXTRA_WARMUP,
    compile_parts,
    compiled,
    format_table,
    measure,
    run_bench,
    warm_up,
)
from vtoken.evals.bench.models import synthetic_inputs
from vtoken.evals.common.methods import parse_method


def test_parse_method():
    assert parse_method("todre") == ("todre", {})
    assert parse_method("todre:rule=maxmin,stage2=false,tau=0.2,stage2_layer=none") == (
        "todre", {"rule": "maxmin", "stage2": False, "tau": 0.2, "stage2_layer": None})
    with pytest.raises(ValueError, match="expected key=value"):
        parse_method("todre:maxmin")


@pytest.mark.parametrize("factory", [tiny_llava, tiny_llava_next])
def test_run_bench_reports_dense_and_methods_side_by_side(factory):
    model = factory()
    inputs = synthetic_inputs(model, batch=2)
    methods = [("todre", {"keep": 8}), ("attn_topk", {"keep": 8, "layer": 2})]
    results, _ = run_bench(model, inputs, methods, repeats=2, warmup=0, new_tokens=3, progress=False)
    dense, todre, fastv = results
    assert [r["method"] for r in results] == ["dense", "todre", "attn_topk"]
    n_visual = (inputs["input_ids"][0] == model.config.image_token_id).sum().item()
    assert dense["visual_tokens_llm"] == n_visual and todre["visual_tokens_llm"] == 8
    assert fastv["visual_tokens_llm"] == n_visual  # FastV prunes inside the LLM
    assert len(todre["ttft_ms_all"]) == 2 and all(t > 0 for t in todre["ttft_ms_all"])
    assert todre["flops_ratio"] > fastv["flops_ratio"] > 1.0
    assert todre["selection_ms"] > 0 and fastv["scoring_ms"] > 0 and fastv["selection_ms"] == 0
    table = format_table(results)
    assert "todre keep=8" in table and "dense" in table


def test_decoder_flops_formula():
    class Cfg:
        hidden_size, num_attention_heads, num_key_value_heads, intermediate_size, hidden_act = 8, 2, 2, 16, "silu"

    n, d, m = 5, 8, 16
    assert decoder_layer_flops(n, Cfg) == 2 * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m)


def test_cli_bench_writes_json_and_plot(tmp_path, monkeypatch):
    import vtoken.evals.bench.llava as bench

    monkeypatch.setattr(bench, "build_model", lambda *a, **k: tiny_llava())
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["bench", "--method", "pool", "--keep", "16", "--repeats", "1", "--warmup", "0",
                 "--new-tokens", "2", "--quiet", "--json", str(out), "--plot", str(png)]) == 0
    data = json.loads(out.read_text())
    assert data["results"][1]["method"] == "pool" and data["results"][1]["visual_tokens_llm"] == 16
    assert "cpu" in data["machine"] and png.stat().st_size > 1000


def test_peak_memory_sees_a_live_cpu_allocation():
    import torch

    from vtoken.evals.bench.memory import PeakMemory

    with PeakMemory("cpu", interval_s=0.0001) as mem:
        x = torch.ones(16, 2**20)  # 64 MiB
        x.add_(1)
        del x
    assert 60 < mem.peak_mb < 80, mem.peak_mb


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_run_bench_on_a_qwen_model(video):
    """A 448x448 image is 32x32 patches -> 256 merged tokens; an 8-frame video is 4 temporal patches of those."""
    from tiny_models import tiny_qwen

    model = tiny_qwen("qwen2_5_vl")
    inputs = synthetic_inputs(model, video=video)
    grid = inputs["video_grid_thw" if video else "image_grid_thw"].tolist()
    assert grid == [[4 if video else 1, 32, 32]]
    results, _ = run_bench(model, inputs, [("todre", {"keep": 0.25})], repeats=1, warmup=0, new_tokens=2,
                           progress=False)
    dense, todre = results
    n = 1024 if video else 256
    assert dense["visual_tokens_llm"] == n and todre["visual_tokens_llm"] == n // 4
    assert todre["flops_ratio"] > 1.0 and todre["of_flops_ideal"] == todre["speedup"] / todre["flops_ratio"]
    assert "0.25" in format_table(results)


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_run_bench_on_a_llava_onevision_model(video):
    """A 2 x 2-tile image: the base view (16 tokens), then the 8 x 8 grid scaled down to 5 x 5 (anyres_max_2) with a
    separator per row (30); an 8-frame video: 2 x 2 pooled tokens per frame and one separator."""
    from tiny_models import tiny_llava_onevision

    model = tiny_llava_onevision()
    inputs = synthetic_inputs(model, video=video)
    assert ("pixel_values_videos" in inputs) == video and ("pixel_values" in inputs) != video
    results, _ = run_bench(model, inputs, [("divprune", {"keep": 0.25})], repeats=1, warmup=0, new_tokens=2,
                           progress=False)
    dense, divprune = results
    n = 8 * 4 + 1 if video else 16 + 5 * 6
    assert dense["visual_tokens_llm"] == n and divprune["visual_tokens_llm"] == int(n / 4 + 0.5)
    assert divprune["flops_ratio"] > 1.0


def test_run_bench_on_an_internvl_model():
    """An image is 7 tiles of 16 tokens each, every tile reduced on its own; the tower's blocks are counted."""
    from tiny_models import tiny_internvl

    from vtoken.evals.bench.models import views_per_sample

    model = tiny_internvl()
    inputs = synthetic_inputs(model, batch=2)
    assert inputs["pixel_values"].shape[0] == 14 and views_per_sample(inputs) == 7
    results, _ = run_bench(model, inputs, [("divprune", {"keep": 0.25})], repeats=1, warmup=0, new_tokens=2,
                           progress=False)
    dense, divprune = results
    assert dense["visual_tokens_llm"] == 7 * 16 and divprune["visual_tokens_llm"] == 7 * 4
    assert divprune["flops_ratio"] > 1.0


def test_qwen_vision_flops_by_hand():
    """Qwen2.5-VL's encoder: windowed blocks attend within 56 px squares (4x4 = 16 patches), full blocks within a
    temporal patch; SwiGLU MLP; one 2x2 merger into the LLM width."""
    from transformers import Qwen2_5_VLConfig

    from vtoken.evals.bench.flops import qwen_vision_parts

    vcfg = Qwen2_5_VLConfig(vision_config=dict(depth=2, num_heads=4, patch_size=14, spatial_merge_size=2,
                                               temporal_patch_size=2, hidden_size=32, out_hidden_size=64,
                                               intermediate_size=48, window_size=56, fullatt_block_indexes=[1]),
                            ).vision_config
    parts = dict((name, flops) for name, flops, _ in qwen_vision_parts(vcfg, [[2, 8, 8]]))
    n, d, m = 2 * 64, 32, 48
    projections, mlp = 2 * n * d * 4 * d, 2 * n * d * m * 3
    assert parts["vision embed"] == 2 * n * (3 * 2 * 14 * 14) * d
    assert parts["vision block 0"] == projections + 4 * n * 16 * d + mlp
    assert parts["vision block 1"] == projections + 2 * 4 * 64 * 64 * d + mlp  # two temporal patches of 64
    assert parts["merger 0"] == 2 * (n // 4) * (4 * d * 4 * d + 4 * d * 64)


def test_run_bench_measures_transprune_and_corematching():
    model = tiny_llava()
    inputs = synthetic_inputs(model)
    methods = [("transprune", {"keep": 0.125}), ("corematching", {"keep": None})]
    results, _ = run_bench(model, inputs, methods, repeats=1, warmup=0, new_tokens=3, progress=False)
    dense, transprune, corematching = results
    assert transprune["visual_tokens_llm"] == 64 and transprune["visual_tokens_last_layer"] == 8  # 12.5% of 64
    assert dense["visual_tokens_last_layer"] == 64 and corematching["visual_tokens_last_layer"] < 64
    assert transprune["flops_ratio"] > 1.0 and corematching["flops_ratio"] > 1.0
    assert corematching["scoring_ms"] > 0 and corematching["decode_speedup"] > 0
    table = format_table(results)
    assert "64->8" in table and "decode speed-up" in table


def test_corematching_sweep_writes_tables_json_and_plot(tmp_path, monkeypatch, capsys):
    import vtoken.evals.studies.corematching_sweep as sweep

    monkeypatch.setattr(sweep, "build_model", lambda *a, **k: tiny_llava())
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    assert sweep.main(["--betas", "0.2,0.6", "--layer-sets", "none,all,1-2", "--repeats", "1", "--warmup", "0",
                       "--new-tokens", "2", "--quiet", "--json", str(out), "--plot", str(png)]) == 0
    data = json.loads(out.read_text())
    configs = [(r["config"]["ffn_layers"], r["config"]["beta"]) for r in data["results"][1:]]
    assert configs == [("none", 0.2), ("all", 0.2), ("all", 0.6), ("1-2", 0.2), ("1-2", 0.6)]
    printed = capsys.readouterr().out
    assert "decode tokens/s over dense" in printed and "prefill speed-up over dense" in printed
    assert png.stat().st_size > 1000
    with pytest.raises(SystemExit):
        sweep.main(["--betas", "1.5"])  # refused before any model is built


def test_compiled_parts_run_the_encoding_the_prefill_and_the_decode_steps_and_are_undone():
    torch.manual_seed(0)
    model = tiny_llava(layers=3)
    inputs = synthetic_inputs(model, batch=1)
    parts = _compat.decoder_of(model.model)
    gen = dict(max_new_tokens=4, do_sample=False, cache_implementation="static", pad_token_id=0)
    with vtoken.patch(model, "divprune", keep=8), torch.no_grad():
        eager = model.generate(**inputs, **gen)
        torch._dynamo.utils.counters.clear()  # Dynamo's reset leaves them
        with compiled(compile_parts(model, "eager")):
            again = model.generate(**inputs, disable_compile=True, **gen)
            # dynamic=False: at least the tower's graph, the prefill's (its length) and a decode step's (one token)
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3
        assert not any("forward" in vars(part) for part in parts)
    assert torch.equal(again, eager)


def test_run_bench_with_compiled_parts_shares_their_graphs_between_methods():
    model = tiny_llava(layers=3)
    inputs = synthetic_inputs(model, batch=1)
    graphs = []
    for methods in ([("random", {"keep": 8})], [("random", {"keep": 8}), ("divprune", {"keep": 8})]):
        torch._dynamo.utils.counters.clear()
        results, _ = run_bench(model, inputs, methods, repeats=2, warmup=1, new_tokens=3, progress=False,
                               cache="static", compile_with="eager")
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    dense, random, divprune = results
    assert random["visual_tokens_llm"] == divprune["visual_tokens_llm"] == 8
    assert len(divprune["ttft_ms_all"]) == 2 and divprune["speedup"] > 0
    assert random["prefill_gflops"] < dense["prefill_gflops"]
    assert graphs[1] == graphs[0]  # DivPrune hands the decoder random's shapes: its graphs, nothing compiled anew
    # each row warms up until a run compiles nothing: dense and random compile in their first run, DivPrune never
    assert [row["warmup_runs"] for row in results] == [2, 2, 1]
    assert [row["compiled_while_timed"] for row in results] == [0, 0, 0]
    assert not any("forward" in vars(part) for part in _compat.decoder_of(model.model))
    assert measure(model, inputs, 2, model.device, "static")[0] > 0  # eager again afterwards


def test_compiling_needs_a_static_cache(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--compile", "cudagraphs", "--quiet"])
    assert exit_info.value.code == 2
    assert "--compile cudagraphs needs --cache static" in capsys.readouterr().err


def test_a_static_cache_and_compiling_take_every_in_llm_method(monkeypatch, tmp_path):
    """attn_topk's budget fixes its count and CoreMatching's threshold depends on the data: both compile with the
    decoder (their scoring, inside the graph, is not timed) and keep their tokens per layer."""
    from vtoken.evals.bench import llava as bench

    monkeypatch.setattr(bench, "build_model", lambda *a, **k: tiny_llava(layers=4))
    common = ["bench", "--method", "attn_topk", "--method", "corematching:keep=None", "--method", "random", "--keep",
              "16", "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--quiet", "--cache", "static"]
    rows = {}
    for extra in ([], ["--compile", "eager"]):
        out = tmp_path / "b.json"
        assert main([*common, *extra, "--json", str(out)]) == 0
        results = json.loads(out.read_text())["results"]
        assert [r["method"] for r in results] == ["dense", "attn_topk", "corematching", "random"]
        assert results[1]["visual_tokens_last_layer"] == 16
        assert all(math.isnan(r["scoring_ms"]) == bool(extra) for r in results[1:3])
        rows[bool(extra)] = results
    assert rows[True][2]["visual_tokens_last_layer"] == rows[False][2]["visual_tokens_last_layer"]


def test_warm_up_runs_on_until_runs_in_a_row_compile_nothing(monkeypatch):
    graphs = {"count": 0}
    monkeypatch.setattr(_compat, "compiled_graphs", lambda: graphs["count"])

    def compiling_until(n):
        calls = {"n": 0}

        def run():
            calls["n"] += 1
            graphs["count"] += calls["n"] <= n  # the first n runs each compile a graph
        return run

    assert warm_up(compiling_until(0), 3) == 3  # nothing to compile: the runs asked for
    assert warm_up(compiling_until(3), 3) == 5  # the third compiled: two quiet runs follow
    assert warm_up(compiling_until(1), 1) == 2  # one run asked: one quiet run is enough
    assert warm_up(compiling_until(100), 3) == 3 + EXTRA_WARMUP  # never settles: bounded
    assert warm_up(compiling_until(100), 0) == 0  # none asked, none made

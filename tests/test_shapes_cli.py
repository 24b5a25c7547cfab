"""`vtoken quality` and `vtoken demo` end to end on a tiny untrained ShapesVQA-format checkpoint (fast; the
shipped model's accuracy is checked in test_shapes_model)."""

import argparse
import json

import pytest

from vtoken.evals import demo, quality
from vtoken.evals import shapes_model as sm
from vtoken.evals import train_shapes as ts


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_shapes")
    processor = sm.build_processor()
    # token clustering needs a tower block before and after it; attn_topk scores after decoder layer 2
    vision, text = {**ts.TINY["vision"], "num_hidden_layers": 2}, {**ts.TINY["text"], "num_hidden_layers": 4}
    sm.build_model(processor, vision=vision, text=text).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_quality_writes_every_method_and_budget(checkpoint, tmp_path, capsys):
    out = tmp_path / "q.json"
    args = parse(quality, ["--model", str(checkpoint), "--n", "8", "--budgets", "1.0,0.25", "--batch-size", "4",
                           "--method", "todre", "--method", "random", "--method", "token_clustering",
                           "--json", str(out), "--plot", str(tmp_path / "q.png"), "--quiet"])
    assert quality.run(args) == 0
    report = json.loads(out.read_text())
    got = {(r["method"], r["budget"]) for r in report["results"]}
    assert got == {(m, b) for m in ("todre", "random", "token_clustering") for b in (1.0, 0.25)}
    by = {(r["method"], r["budget"]): r for r in report["results"]}
    assert by[("random", 1.0)]["visual_tokens"] == 196 and by[("random", 0.25)]["visual_tokens"] == 49
    assert by[("random", 1.0)]["accuracy"] == report["dense"]["accuracy"]  # keep-all is lossless
    assert (tmp_path / "q.png").stat().st_size > 0
    assert "todre" in capsys.readouterr().out


def test_demo_prints_the_table_and_draws_the_kept_tokens(checkpoint, tmp_path, capsys):
    png, table = tmp_path / "demo.png", tmp_path / "demo.json"
    args = parse(demo, ["--model", str(checkpoint), "--n", "4", "--budgets", "0.25", "--batch-size", "4",
                        "--latency-batch", "2", "--repeats", "1", "--png", str(png), "--json", str(table),
                        "--method", "todre", "--method", "pool", "--method", "attn_topk"])
    assert demo.run(args) == 0
    out = capsys.readouterr().out
    for method in ("dense", "todre", "pool", "attn_topk"):
        assert method in out
    assert "speed-up" in out and png.stat().st_size > 0
    rows = json.loads(table.read_text())["results"]
    settings = [("dense", 1.0)] + [(m, 0.25) for m in ("todre", "pool", "attn_topk")]
    assert [(r["method"], r["budget"]) for r in rows] == settings
    assert rows[0]["speedup"] == 1.0 and all(r["prefill_ms"] > 0 for r in rows)


def test_methods_without_a_budget_are_refused_before_any_work(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="no visual-token budget"):
        quality.run(parse(quality, ["--model", str(checkpoint), "--method", "svg2"]))

"""`vtoken quality` and `vtoken demo` end to end on a tiny untrained ShapesVQA-format checkpoint (fast; the
shipped model's accuracy is checked in test_shapes_model)."""

import argparse
import json

import pytest

from vtoken.cli import UsageError
from vtoken.evals.shapes import demo, quality


def shapes_task(checkpoint) -> list[str]:
    """Arguments that measure a ShapesVQA (not -Hard) checkpoint: --task defaults to hard."""
    return ["--task", "shapes", "--model", str(checkpoint)]


def parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_quality_writes_every_method_and_budget(tiny_shapes_checkpoint, tmp_path, capsys):
    out = tmp_path / "q.json"
    args = parse(quality, [*shapes_task(tiny_shapes_checkpoint), "--n", "8", "--budgets", "1.0,0.25",
                           "--batch-size", "4", "--method", "todre", "--method", "random",
                           "--method", "token_clustering", "--json", str(out), "--plot", str(tmp_path / "q.png"),
                           "--quiet"])
    assert quality.run(args) == 0
    report = json.loads(out.read_text())
    got = {(r["method"], r["budget"]) for r in report["results"]}
    assert got == {(m, b) for m in ("todre", "random", "token_clustering") for b in (1.0, 0.25)}
    by = {(r["method"], r["budget"]): r for r in report["results"]}
    assert by[("random", 1.0)]["visual_tokens"] == 196 and by[("random", 0.25)]["visual_tokens"] == 49
    assert by[("random", 1.0)]["accuracy"] == report["dense"]["accuracy"]  # keep-all is lossless
    assert (tmp_path / "q.png").stat().st_size > 0
    assert "todre" in capsys.readouterr().out


def test_demo_prints_the_table_and_draws_the_kept_tokens(tiny_shapes_checkpoint, tmp_path, capsys):
    png, table = tmp_path / "demo.png", tmp_path / "demo.json"
    args = parse(demo, [*shapes_task(tiny_shapes_checkpoint), "--n", "4", "--budgets", "0.25", "--batch-size", "4",
                        "--latency-batch", "2", "--repeats", "1", "--png", str(png), "--json", str(table),
                        "--method", "todre", "--method", "pool", "--method", "attn_topk", "--method", "transprune",
                        "--method", "corematching"])
    assert demo.run(args) == 0
    out = capsys.readouterr().out
    for method in ("dense", "todre", "pool", "attn_topk", "transprune", "corematching"):
        assert method in out
    assert "speed-up" in out and png.stat().st_size > 0
    rows = json.loads(table.read_text())["results"]
    settings = [("dense", 1.0)] + [(m, 0.25) for m in ("todre", "pool", "attn_topk", "transprune", "corematching")]
    assert [(r["method"], r["budget"]) for r in rows] == settings
    assert rows[0]["speedup"] == 1.0 and all(r["prefill_ms"] > 0 for r in rows)


def test_methods_for_other_models_are_refused_before_any_work(tiny_shapes_checkpoint, tmp_path):
    with pytest.raises(UsageError, match="svg2 is not a LLaVA method.*use vtoken bench-dit"):
        quality.run(parse(quality, [*shapes_task(tiny_shapes_checkpoint), "--method", "svg2"]))


def test_quality_runs_method_variants_once_at_their_own_budget(tiny_shapes_checkpoint, tmp_path, capsys):
    out = tmp_path / "q.json"
    args = parse(quality, [*shapes_task(tiny_shapes_checkpoint), "--n", "4", "--budgets", "0.5,0.25",
                           "--batch-size", "4", "--method", "transprune", "--method", "transprune:iga=false",
                           "--method", "corematching:keep=none", "--json", str(out), "--plot", str(tmp_path / "q.png"),
                           "--quiet"])
    assert quality.run(args) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["label"], r["budget"]) for r in rows] == [
        ("transprune", 0.5), ("transprune", 0.25), ("transprune iga=False", 0.5), ("transprune iga=False", 0.25),
        ("corematching keep=None", None)]
    assert rows[2]["config"] == {"keep": 0.5, "iga": False}
    assert "own budget" in capsys.readouterr().out
    with pytest.raises(UsageError, match="--method corematching:beta=2.*beta=2.0 is out of range"):
        quality.run(parse(quality, [*shapes_task(tiny_shapes_checkpoint), "--method", "corematching:beta=2"]))


def test_quality_and_demo_run_the_hard_task(tiny_hard_checkpoint, tiny_shapes_checkpoint, tmp_path, capsys):
    out = tmp_path / "q.json"
    args = parse(quality, ["--task", "hard", "--model", str(tiny_hard_checkpoint), "--n", "8", "--budgets", "0.05",
                           "--batch-size", "8", "--method", "divprune", "--json", str(out),
                           "--plot", str(tmp_path / "q.png"), "--quiet"])
    assert quality.run(args) == 0
    report = json.loads(out.read_text())
    assert report["task"] == "hard" and report["title"].startswith("ShapesVQA-Hard test (n=8)")
    assert set(report["dense"]["per_type"]) == {"digit", "count", "presence", "nearest"}
    assert [(r["method"], r["visual_tokens"]) for r in report["results"]] == [("divprune", 10)]  # 5% of 196
    table = tmp_path / "demo.json"
    args = parse(demo, ["--task", "hard", "--model", str(tiny_hard_checkpoint), "--n", "4", "--budgets", "0.1",
                        "--batch-size", "4", "--latency-batch", "2", "--repeats", "1", "--png", str(tmp_path / "d.png"),
                        "--json", str(table), "--method", "random"])
    assert demo.run(args) == 0
    assert json.loads(table.read_text())["task"] == "hard" and "ShapesVQA-Hard test" in capsys.readouterr().out
    for wrong, task in ((tiny_shapes_checkpoint, "hard"), (tiny_hard_checkpoint, "shapes")):
        with pytest.raises(UsageError, match=f"was not trained on the .* task \\(--task {task}\\)"):
            quality.run(parse(quality, ["--task", task, "--model", str(wrong), "--n", "2"]))


@pytest.mark.parametrize("command", ["quality", "demo"])
def test_method_options_parse_the_same_in_quality_and_demo(command, tiny_shapes_checkpoint, tmp_path, capsys):
    """``--method name:key=value`` as bench reads it; an option that sets the budget runs once, at its own."""
    table = tmp_path / "t.json"
    common = [*shapes_task(tiny_shapes_checkpoint), "--n", "4", "--budgets", "0.25", "--batch-size", "4",
              "--method", "tokenflex:num_tokens=16", "--method", "todre:rule=maxmin", "--json", str(table)]
    if command == "quality":
        assert quality.run(parse(quality, [*common, "--plot", str(tmp_path / "q.png"), "--quiet"])) == 0
    else:
        assert demo.run(parse(demo, [*common, "--latency-batch", "2", "--repeats", "1",
                                     "--png", str(tmp_path / "d.png")])) == 0
    rows = [r for r in json.loads(table.read_text())["results"] if r["label"] != "dense"]
    assert sorted((r["label"], r["budget"], r["visual_tokens"]) for r in rows) == [
        ("todre rule=maxmin", 0.25, 49), ("tokenflex num_tokens=16", None, 16)]
    assert "tokenflex num_tokens=16" in capsys.readouterr().out

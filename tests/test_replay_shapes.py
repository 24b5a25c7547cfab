"""`vtoken replay-shapes`: a chain of train-shapes runs, run again from its report."""

import argparse
import json

import pytest
from safetensors.torch import load_file

from vtoken import cli
from vtoken.cli import UsageError
from vtoken.evals.shapes import model as sm
from vtoken.evals.shapes import replay as replay_shapes
from vtoken.evals.shapes import training as ts

COMMON = ["--task", "hard", "--tiny", "--vision-batch-size", "2", "--scenes", "4", "--batch-size", "2", "--turns", "2",
          "--eval-every", "0", "--test-size", "0", "--threads", "1"]


def defaults() -> dict:
    parser = argparse.ArgumentParser()
    ts.add_arguments(parser)
    return vars(parser.parse_args(["--out", "."]))


@pytest.fixture(scope="module")
def tiny_chain(tmp_path_factory):
    """Stage 1 alone, then stage 2 from it with the tower trained too: the shipped hard model's pattern."""
    root = tmp_path_factory.mktemp("chain")
    parser = argparse.ArgumentParser()
    ts.add_arguments(parser)
    ts.train(parser.parse_args(["--out", str(root / "tower"), "--vision-only", "--vision-steps", "2", *COMMON]))
    ts.train(parser.parse_args(["--out", str(root / "model"), "--init", str(root / "tower"), "--vision-steps", "0",
                                "--steps", "2", "--tower-lr", "1e-3", "--seed", "3", *COMMON]))
    return root


def test_replay_retrains_the_chain_to_the_same_weights_and_resumes(tiny_chain, tmp_path, capsys):
    out = tmp_path / "replay"
    assert cli.main(["replay-shapes", str(tiny_chain / "model"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["01-tower", "02-model"]
    replayed = json.loads((out / "02-model" / "training_report.json").read_text())
    original = json.loads((tiny_chain / "model" / "training_report.json").read_text())
    for new, old in zip(ts.chain_runs(replayed), ts.chain_runs(original), strict=True):
        drop = {"out", "init"}
        assert {k: v for k, v in new["args"].items() if k not in drop} == \
               {k: v for k, v in old["args"].items() if k not in drop}
    assert replayed["init"]["args"]["out"] == str(out / "01-tower")
    # same code, same arguments, same seeds: the same bytes
    weights = load_file(out / "02-model" / "model.safetensors")
    ref = load_file(tiny_chain / "model" / "model.safetensors")
    assert weights.keys() == ref.keys() and all((weights[k] == ref[k]).all() for k in ref)
    sm.load_task_model("hard", out / "02-model")  # a usable checkpoint for the task
    # a second call finds both runs done and trains nothing
    capsys.readouterr()
    assert cli.main(["replay-shapes", str(tiny_chain / "model" / "training_report.json"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("kept") == 2


def test_dry_run_prints_one_command_per_run_and_trains_nothing(tiny_chain, tmp_path, capsys):
    assert cli.main(["replay-shapes", str(tiny_chain / "model"), "--out", str(tmp_path / "r"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("vtoken train-shapes --task hard") for line in lines)
    assert "--vision-only" in lines[0] and "--init" not in lines[0]
    assert f"--init {tmp_path / 'r' / '01-tower'}" in lines[1] and "--tower-lr 0.001" in lines[1]
    assert not (tmp_path / "r").exists()


def test_a_time_limited_run_replays_the_steps_it_ran():
    run = {"args": {**defaults(), "out": "/x/m", "time_limit": 40.0, "steps": 4000}, "language_steps": 1857}
    argv = replay_shapes.run_argv(run, defaults())
    assert "--time-limit" not in argv and argv[argv.index("--steps") + 1] == "1857"
    run["args"]["time_limit"], run["language_steps"] = None, 0
    assert "--steps" in replay_shapes.run_argv(run, defaults())  # 4000, as given


def test_bad_reports_are_refused_with_the_argument_named(tmp_path):
    with pytest.raises(UsageError, match="report: no training report at"):
        replay_shapes.load_report(str(tmp_path))
    run = {"args": {**defaults(), "out": "/x/m", "gone_option": 1}}
    with pytest.raises(UsageError, match="no longer takes: gone_option"):
        replay_shapes.run_argv(run, defaults())

"""The ``vtoken`` command line: a bad argument is a one-line error and exit code 2 (``--debug``: the traceback), an
internal error keeps its traceback, every ``--help`` shows the defaults, and the speed commands say how loaded the
machine was and pick their threads from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import tiny_llava, tiny_llava_next

import vtoken
from vtoken import cli
from vtoken.evals.common import machine

FAST_BENCH = ["--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--quiet"]


def usage_error(argv: list[str], capsys) -> str:
    """Run ``vtoken argv`` in-process, expect argparse-style exit 2, return stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture
def tiny_bench_model(monkeypatch):
    """``vtoken bench`` on a tiny LLaVA (4 tower blocks: token clustering needs some before LLaVA's feature layer)."""
    import vtoken.evals.bench.llava as bench

    built = []
    monkeypatch.setattr(bench, "build_model", lambda *a, **k: built.append(tiny_llava(vision_layers=4)) or built[-1])
    return built


@pytest.fixture
def quiet_machine(monkeypatch):
    monkeypatch.setattr(machine, "cpu_load", lambda: (0.0, 2, 2))


# -- item 8: usage errors -----------------------------------------------------------------------------------------
def test_usage_error_exits_2_with_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "vtoken.cli", "bench", "--model", str(tmp_path / "nonexistent")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("vtoken bench: error: --model")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where):
    argv = ["bench", "--method", "svg2"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(cli.UsageError, match="bench-dit"):
        cli.main(argv)


def test_an_internal_error_keeps_its_traceback(monkeypatch, tiny_bench_model, quiet_machine):
    import vtoken.evals.bench.llava as bench

    def broken(*args, **kwargs):
        raise ValueError("a bug, not a usage error")

    monkeypatch.setattr(bench, "run_bench", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["bench", *FAST_BENCH])


def test_bench_names_the_command_for_a_method_of_another_model_family(capsys):
    err = usage_error(["bench", "--method", "svg2"], capsys)
    assert "svg2 is not a LLaVA method" in err and "Wan" in err and "vtoken bench-dit" in err
    assert "unknown argument" not in err


def test_vit_only_methods_are_sent_to_bench_vit():
    from types import SimpleNamespace

    from vtoken.evals.common.arguments import not_for_llava

    info = SimpleNamespace(name="vit_only", hosts=("timm_vit", "open_clip_vit"))  # what its stages would give
    message = not_for_llava(info)
    assert "vit_only is not a LLaVA method" in message and "timm VisionTransformer" in message
    assert message.endswith("use vtoken bench-vit")


def test_unknown_method_lists_the_known_ones(capsys):
    err = usage_error(["bench", "--method", "fastvv"], capsys)
    assert "'fastvv'" in err and "todre" in err


def test_bench_runs_token_clustering_like_quality(tmp_path, tiny_bench_model, quiet_machine):
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--method", "token_clustering", "--method", "token_clustering:num_clusters=0.25",
                 "--keep", "16", *FAST_BENCH, "--json", str(out)]) == 0
    dense, from_keep, own_args = json.loads(out.read_text())["results"]
    assert from_keep["config"] == {"num_clusters": 16, "reconstruct": False}  # as `vtoken quality` sets it
    assert own_args["config"] == {"num_clusters": 0.25, "reconstruct": False}
    assert dense["visual_tokens_llm"] == 64 and from_keep["visual_tokens_llm"] == own_args["visual_tokens_llm"] == 16
    assert from_keep["flops_ratio"] > 1.0


def test_bench_counts_the_clustered_tower_in_the_flops(tmp_path, tiny_bench_model, quiet_machine):
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--method", "token_clustering:num_clusters=16,reconstruct=true", "--keep", "16",
                 *FAST_BENCH, "--json", str(out)]) == 0
    dense, clustered = json.loads(out.read_text())["results"]
    # reconstructed before LLaVA reads the tower: the LLM sees every token, only the tower got cheaper
    assert clustered["visual_tokens_llm"] == dense["visual_tokens_llm"] == 64
    assert 1.0 < clustered["flops_ratio"]


def test_bench_refuses_a_method_the_model_does_not_support_before_timing(monkeypatch, capsys, quiet_machine):
    import vtoken.evals.bench.llava as bench

    monkeypatch.setattr(bench, "build_model", lambda *a, **k: tiny_llava_next())
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("timed a method that cannot be installed"))
    err = usage_error(["bench", "--method", "token_clustering", "--keep", "4", *FAST_BENCH], capsys)
    assert "token_clustering" in err and "LlavaNext" in err


def test_bench_vit_refuses_a_model_token_clustering_cannot_patch(capsys, tmp_path):
    err = usage_error(["bench-vit", "--models", "resnet18", "--reps", "1", "--out", str(tmp_path)], capsys)
    assert "resnet18" in err and "ResNet" in err and "timm VisionTransformer" in err
    err = usage_error(["bench-vit", "--models", "vit_tiny_patch16_224", "no_such_net", "--out", str(tmp_path)],
                      capsys)
    assert "no_such_net" in err and "timm" in err
    assert not (tmp_path / "bench_vit.json").exists()  # refused before measuring the valid one


@pytest.mark.parametrize(("argv", "option"), [
    (["demo", "--n", "0"], "--n"), (["demo", "--repeats", "-1"], "--repeats"), (["demo", "--batch-size", "0"],
                                                                             "--batch-size"),
    (["demo", "--latency-batch", "0"], "--latency-batch"), (["quality", "--n", "0"], "--n"),
    (["bench", "--repeats", "0"], "--repeats"), (["bench", "--new-tokens", "0"], "--new-tokens"),
    (["bench", "--batch", "0"], "--batch"), (["bench", "--warmup", "-1"], "--warmup"),
    (["bench", "--threads", "0"], "--threads"), (["bench-vit", "--reps", "0"], "--reps"),
    (["bench-dit", "--reps", "0"], "--reps"), (["train-shapes", "--out", "x", "--steps", "-1"], "--steps"),
    (["eval", "--model_args", "x", "--tasks", "t", "--num_processes", "0"], "--num_processes"),
])
def test_counts_are_checked_when_parsed(argv, option, capsys):
    err = usage_error(argv, capsys)
    assert f"argument {option}:" in err and "integer" in err


def test_bench_model_that_is_neither_a_preset_nor_a_checkpoint(capsys, tmp_path):
    err = usage_error(["bench", "--model", str(tmp_path / "nonexistent")], capsys)
    assert "nonexistent" in err and "tiny-llava-1.5" in err and "llava-1.5-7b" in err
    err = usage_error(["bench", "--model", "tiny-llava"], capsys)  # offline in tests: no hub to ask
    assert "offline" in err and "tiny-llava-1.5" in err
    (tmp_path / "empty").mkdir()
    assert "config.json" in usage_error(["bench", "--model", str(tmp_path / "empty")], capsys)


@pytest.mark.parametrize("top_p", ["0", "0.5,1.5", "nan"])
def test_bench_dit_checks_top_p_like_svg2(top_p, capsys):
    err = usage_error(["bench-dit", "--top-p", top_p], capsys)
    assert "argument --top-p" in err and "(0.0, 1.0]" in err


def test_bench_dit_accepts_what_svg2_accepts():
    args = cli.command_parser("bench-dit").parse_args(["--top-p", "0.25,1", "--min-key-cluster-ratio", "0"])
    assert args.top_p == [0.25, 1.0] and args.min_key_cluster_ratio == 0.0


@pytest.mark.parametrize("argv", [["bench", "--keep", "0"], ["bench", "--keep", "1.5"], ["demo", "--budgets", "0.5,0"],
                                  ["quality", "--budgets", "x"], ["bench-vit", "--num-clusters", "7"],
                                  ["bench-vit", "--cluster-after", "0"], ["bench", "--device", "tpu"]])
def test_values_are_checked_when_parsed(argv, capsys):
    assert f"argument {argv[1]}" in usage_error(argv, capsys)


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_shows_every_default(command):
    parser = cli.command_parser(command)
    text = parser.format_help()
    blocks, current = {}, None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):
            current = stripped.split()[0].rstrip(",")
            blocks[current] = stripped
        elif current is not None and line.startswith("    "):
            blocks[current] += " " + stripped
        else:
            current = None
    for action in parser._actions:
        if not action.option_strings or action.default is None or action.default is False or action.required:
            continue
        if action.default == "==SUPPRESS==":
            continue
        block = blocks[action.option_strings[0]]
        assert "default" in block.lower(), f"vtoken {command} {action.option_strings[0]}: {block}"


# -- item 9: machine load and threads ----------------------------------------------------------------------------
@pytest.mark.parametrize(("load", "cores", "threads"), [(0.0, 2, 2), (0.4, 2, 2), (1.0, 2, 1), (4.0, 2, 1),
                                                         (3.2, 16, 13), (float("nan"), 4, 4)])
def test_default_threads_are_the_free_cores(load, cores, threads):
    plan = machine.plan_threads(None, load, cores)
    assert plan.threads == threads and plan.chosen
    assert (plan.warning is not None) == (load >= cores - 0.5)


def test_the_load_is_spread_over_every_core_of_the_machine():
    # 2 of 16 cores for this process, load 3.2 on the machine: both of ours are free
    assert machine.plan_threads(None, 3.2, 2, 16).threads == 2 and machine.plan_threads(2, 3.2, 2, 16).warning is None
    assert machine.plan_threads(None, 15.0, 2, 16).threads == 1


def test_requested_threads_are_kept_but_oversubscription_is_named():
    plan = machine.plan_threads(2, 4.0, 2)
    assert plan.threads == 2 and not plan.chosen
    assert "4.00" in plan.warning and "2 torch threads" in plan.warning
    assert machine.plan_threads(2, 0.1, 2).warning is None


def test_bench_prints_load_and_threads_and_warns_when_oversubscribed(tmp_path, monkeypatch, capsys, tiny_bench_model):
    monkeypatch.setattr(machine, "cpu_load", lambda: (4.0, 2, 2))
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--method", "pool", "--keep", "16", *FAST_BENCH, "--json", str(out)]) == 0
    printed = capsys.readouterr()
    assert "load 4.00" in printed.out and "1 torch thread" in printed.out
    assert "warning" in printed.err and "unreliable" in printed.err
    assert torch.get_num_threads() == 1
    report = json.loads(out.read_text())["machine"]
    assert report["load_1min"] == 4.0 and report["cores_available"] == 2 and report["torch_threads"] == 1
    assert "unreliable" in report["load_warning"]


def test_demo_prints_load_and_threads(tiny_shapes_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(machine, "cpu_load", lambda: (0.2, 2, 2))
    assert cli.main(["demo", "--task", "shapes", "--model", str(tiny_shapes_checkpoint), "--n", "2", "--budgets",
                     "0.25", "--batch-size", "2", "--latency-batch", "2", "--repeats", "1", "--method", "pool",
                     "--png", str(tmp_path / "d.png"), "--json", str(tmp_path / "d.json")]) == 0
    printed = capsys.readouterr()
    assert "load 0.20" in printed.out and "2 torch threads" in printed.out and "warning" not in printed.err
    assert json.loads((tmp_path / "d.json").read_text())["machine"]["load_warning"] is None


def test_methods_command_still_lists_every_method(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in vtoken.methods())


def test_bench_vit_checks_the_clustering_arguments_against_an_hf_checkpoint(tmp_path, capsys):
    tiny_llava(vision_layers=4).save_pretrained(tmp_path / "llava")  # LLaVA reads the output of block 3
    err = usage_error(["bench-vit", "--hf", str(tmp_path / "llava"), "--cluster-after", "3", "--out",
                       str(tmp_path / "out")], capsys)
    assert "--hf" in err and "cluster_after=3" in err
    assert not (tmp_path / "out").exists()

"""Local lmms-eval tasks (``write_task``) and the ``vtoken eval`` wrapper's result checks, without a model."""

import argparse
import importlib.util
import json

import pytest
from PIL import Image

from vtoken.evals.lmms import cli as eval_cli
from vtoken.evals.lmms.tasks import write_task

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def squares():
    return [(Image.new("RGB", (48, 40), rgb), "What colour is the square?", name) for name, rgb in COLOURS.items()]


def load_utils(task_dir):
    spec = importlib.util.spec_from_file_location("task_utils", task_dir / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_free_form_task_files(tmp_path):
    task_dir = write_task(tmp_path / "tasks", "toy", squares(), max_new_tokens=5, post_prompt="\nOne word.")
    assert task_dir == (tmp_path / "tasks" / "toy").resolve()
    yaml = (task_dir / "toy.yaml").read_text()
    assert "task: toy" in yaml and "output_type: generate_until" in yaml and "max_new_tokens: 5" in yaml
    assert json.dumps(str(task_dir / "test.jsonl")) in yaml  # absolute: lmms-eval resolves it against the cwd
    rows = [json.loads(line) for line in (task_dir / "test.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == list(COLOURS)
    utils = load_utils(task_dir)
    (image,) = utils.doc_to_visual(rows[1])
    assert image.mode == "RGB" and image.size == (48, 40) and image.getpixel((5, 5)) == COLOURS["green"]
    prompt = utils.doc_to_text(rows[0], {"pre_prompt": "", "post_prompt": "\nOne word."})
    assert prompt == "What colour is the square?\nOne word."
    assert utils.process_results(rows[0], ["  Red.\n"]) == {"exact_match": 1.0}
    assert utils.process_results(rows[0], ["reddish"]) == {"exact_match": 0.0}


def test_multiple_choice_task_files(tmp_path):
    task_dir = write_task(tmp_path, "toy_mc", squares(), choices=["red", "green", "blue"])
    yaml = (task_dir / "toy_mc.yaml").read_text()
    assert "output_type: multiple_choice" in yaml and "metric: acc" in yaml
    rows = [json.loads(line) for line in (task_dir / "test.jsonl").read_text().splitlines()]
    utils = load_utils(task_dir)
    assert [utils.doc_to_target(r) for r in rows] == [0, 1, 2]
    assert utils.doc_to_choice(rows[0]) == ["red", "green", "blue"]


@pytest.mark.parametrize("kwargs, examples, message", [
    (dict(name="9lives"), squares(), "name must start with a letter"),
    (dict(name="toy", split="te st"), squares(), "split must"),
    (dict(name="toy", max_new_tokens=0), squares(), "max_new_tokens must be a positive int"),
    (dict(name="toy", choices=["red"]), squares(), "choices must hold two or more"),
    (dict(name="toy", choices=["red", "green"]), squares(), "'blue' is not one of choices"),
    (dict(name="toy"), [], "examples is empty"),
    (dict(name="toy"), [("not an image", "q", "a")], "must be a PIL.Image.Image"),
    (dict(name="toy"), [(Image.new("RGB", (4, 4)), "q")], "expected (PIL image, question, answer)"),
    (dict(name="toy"), [(Image.new("RGB", (4, 4)), "q", 3)], "must be strings"),
])
def test_write_task_errors(tmp_path, kwargs, examples, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        write_task(tmp_path, examples=examples, **kwargs)


# -- vtoken eval: everything after lmms-eval has run ---------------------------------------------------------
RESULTS = {"results": {
    "toy": {"alias": "toy", "exact_match,none": 0.5, "exact_match_stderr,none": 0.25,
            "exact_match_stderr_clt,none": 0.25, "exact_match_stderr_clustered,none": "N/A"},
    "toy_mc": {"alias": "toy_mc", "acc,none": 1.0, "acc_stderr,none": 0.0},
    "broken": {"alias": "broken", "acc,none": float("nan")},
}}


def test_check_results_names_missing_and_empty_tasks():
    assert eval_cli.check_results(RESULTS, ["toy", "toy_mc"]) == []
    problems = eval_cli.check_results(RESULTS, ["toy", "nope", "broken"])
    assert len(problems) == 2 and problems[0].startswith("nope: no results") and problems[1].startswith("broken:")
    assert eval_cli.check_results({"groups": {"grp": {"acc,none": 0.3}}}, ["grp"]) == []


def test_format_table_skips_stderr_columns():
    lines = eval_cli.format_table(RESULTS, ["toy", "toy_mc"]).splitlines()
    assert lines[0].split() == ["task", "metric", "value", "stderr"]
    assert lines[1].split() == ["toy", "exact_match", "0.5000", "0.2500"]
    assert lines[2].split() == ["toy_mc", "acc", "1.0000", "0.0000"]
    assert len(lines) == 3


def test_read_stats_adds_up_ranks(tmp_path):
    base = dict(method="todre", config={"keep": 16}, samples=2, prefills=1, visual_tokens_input=128,
                visual_tokens_llm=32, visual_tokens_layer_mean=32.0, selection_time_s=0.5, scoring_time_s=0.0)
    for rank in (0, 1):
        (tmp_path / f"stats.rank{rank}.json").write_text(json.dumps(base))
    total = eval_cli.read_stats(str(tmp_path / "stats.json"))
    assert total["samples"] == 4 and total["visual_tokens_llm"] == 64 and total["selection_time_s"] == 1.0
    line = eval_cli.format_stats(total)
    assert "64.0 in the prompt, 16.0 into the LLM" in line and "(25.0% of the prompt's)" in line
    assert eval_cli.read_stats(str(tmp_path / "absent.json")) is None


def namespace(tmp_path, **kw):
    args = dict(model_args="pretrained=x,method=todre,keep=16", tasks="toy,toy_mc",
                output_path=str(tmp_path / "out"), num_processes=1, forwarded=["--limit", "2"])
    return argparse.Namespace(**{**args, **kw})


needs_lmms = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                                 reason="vtoken eval checks that lmms-eval is installed (pip install 'vtoken[eval]')")


def fake_lmms(monkeypatch, results: dict | None, seen: list):
    """Stands in for the lmms-eval process: records its command, writes ``results`` like lmms-eval would."""

    def call(cmd):
        seen.append(cmd)
        out = cmd[cmd.index("--output_path") + 1]
        if results is not None:
            folder = eval_cli.Path(out) / "x"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "20260101_000000_results.json").write_text(json.dumps(results))
        return 0  # like the real CLI, whatever happened

    monkeypatch.setattr(eval_cli.subprocess, "call", call)


@needs_lmms
def test_eval_wrapper_passes_when_every_task_has_metrics(tmp_path, monkeypatch, capsys):
    seen = []
    fake_lmms(monkeypatch, RESULTS, seen)
    args = namespace(tmp_path, model_args="pretrained=x,batch_size=4,method=todre,keep=16")
    assert eval_cli.run(args) == 0
    cmd = seen[0]
    assert cmd[cmd.index("--model") + 1] == "vtoken" and cmd[-4:] == ["--limit", "2", "--batch_size", "4"]
    model_args = cmd[cmd.index("--model_args") + 1]
    assert model_args.startswith("pretrained=x,method=todre,keep=16,stats_path=") and "batch_size" not in model_args
    assert "exact_match  0.5000" in capsys.readouterr().out


@needs_lmms
def test_eval_wrapper_fails_on_missing_task_or_missing_file(tmp_path, monkeypatch, capsys):
    fake_lmms(monkeypatch, {"results": {"toy": RESULTS["results"]["toy"]}}, [])
    assert eval_cli.run(namespace(tmp_path)) == 1
    assert "toy_mc: no results" in capsys.readouterr().err
    fake_lmms(monkeypatch, None, [])
    assert eval_cli.run(namespace(tmp_path, output_path=str(tmp_path / "empty"))) == 1
    assert "wrote no results file" in capsys.readouterr().err


@needs_lmms
def test_eval_wrapper_argument_errors(tmp_path, monkeypatch, capsys):
    fake_lmms(monkeypatch, RESULTS, [])
    assert eval_cli.run(namespace(tmp_path, forwarded=["--model", "llava_hf"])) == 2
    assert "--model is always vtoken" in capsys.readouterr().err
    twice = namespace(tmp_path, model_args="pretrained=x,batch_size=2", forwarded=["--batch_size", "2"])
    assert eval_cli.run(twice) == 2
    assert "give the batch size once" in capsys.readouterr().err
    seen = []
    fake_lmms(monkeypatch, RESULTS, seen)
    assert eval_cli.run(namespace(tmp_path, num_processes=2)) == 0
    assert seen[0][1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_cli_forwards_unknown_arguments(monkeypatch):
    from vtoken import cli

    got = {}

    def run(args):
        got["args"] = args
        return 0

    monkeypatch.setattr(eval_cli, "run", run)
    cli.main(["eval", "--model_args", "pretrained=x", "--tasks", "toy", "--include_path", "t", "--limit", "3"])
    assert got["args"].forwarded == ["--include_path", "t", "--limit", "3"]
    got.clear()
    cli.main(["eval", "--model_args", "pretrained=x", "--tasks", "toy", "--model", "m"])  # no prefix matching
    assert got["args"].model_args == "pretrained=x" and got["args"].forwarded == ["--model", "m"]

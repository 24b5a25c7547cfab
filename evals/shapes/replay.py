"""``vtoken replay-shapes``: retrain a ShapesVQA model from its training report, one command for a chain of runs.

A shipped model may be the last of many ``vtoken train-shapes`` runs, each continuing the one before (``--init``);
its ``training_report.json`` holds every run's report, arguments included. Replaying runs them again, oldest
first, each from the one before, into ``--out``/``NN-name``. A run whose directory already holds a report is
kept, so an interrupted replay resumes where it stopped. A run that had a ``--time-limit`` replays the steps it
ran (``--steps``), so the replay does not depend on how fast the machine is.

The replay runs today's code: where the recipe changed along the chain, the replayed runs follow the code, not the
version they first ran with, and the weights differ even though every run's arguments are the same.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from vtoken.cli import UsageError
from vtoken.evals.shapes import training as train_shapes

# Arguments a report records that a replay sets itself (where each run reads and writes) or that only shape the
# command line (--debug).
NOT_REPLAYED = ("out", "init", "debug")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("report", help="a training_report.json (e.g. evals/shapes/assets/shapes_hard_llava/"
                                       "training_report.json), or the checkpoint directory that holds it")
    parser.add_argument("--out", required=True, help="one directory per run is made here; the last is the model")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")


def run_argv(run: dict, defaults: dict) -> list[str]:
    """The ``train-shapes`` arguments of one recorded run, without ``--out``/``--init``: those that differ from
    today's defaults, with a time limit replaced by the steps the run took."""
    args = dict(run["args"])
    unknown = sorted(set(args) - set(defaults) - set(NOT_REPLAYED))
    if unknown:
        raise UsageError(f"report: the run saved to {args.get('out')} has arguments train-shapes no longer takes: "
                         f"{', '.join(unknown)}")
    if args.get("time_limit") is not None and run.get("language_steps"):
        args["steps"], args["time_limit"] = run["language_steps"], None
    argv = []
    for key, value in args.items():
        if key in NOT_REPLAYED or value is None or value is False or value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, format(value, "g") if isinstance(value, float) else str(value)]
    return argv


def load_report(path: str) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "training_report.json"
    if not path.is_file():
        raise UsageError(f"report: no training report at {path}")
    return json.loads(path.read_text())


def run(args: argparse.Namespace) -> int:
    parser = argparse.ArgumentParser()
    train_shapes.add_arguments(parser)
    defaults = vars(parser.parse_args(["--out", "."]))
    runs = train_shapes.chain_runs(load_report(args.report))[::-1]  # oldest first
    out = Path(args.out)
    commands, init = [], None
    for i, recorded in enumerate(runs):
        target = out / f"{i + 1:02d}-{Path(recorded['args']['out']).name}"
        argv = run_argv(recorded, defaults) + (["--init", str(init)] if init else []) + ["--out", str(target)]
        commands.append((target, argv))
        init = target
    for _, argv in commands:
        print("vtoken train-shapes " + shlex.join(argv))
    if args.dry_run:
        return 0
    for i, (target, argv) in enumerate(commands):
        if (target / "training_report.json").is_file():
            print(f"run {i + 1} of {len(commands)}: already in {target}, kept")
            continue
        print(f"run {i + 1} of {len(commands)}: {target}")
        train_shapes.run(parser.parse_args(argv))
    print(f"replayed {len(commands)} runs; the model is {commands[-1][0]}")
    return 0

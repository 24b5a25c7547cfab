"""``vtoken eval``: lmms-eval with ``--model vtoken``, then a check of the results file it wrote.

The lmms-eval CLI exits 0 even when a task fails to load or to evaluate, so this wrapper reads the results JSON
and exits non-zero unless every requested task has metrics. It also asks the model for a visual-token count
(``stats_path``) and prints it under the metric table. Arguments it does not know go to lmms-eval unchanged.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from vtoken.evals.common.arguments import positive_int

FORWARDS_UNKNOWN_ARGS = True  # vtoken.cli hands us what it does not parse, in ``args.forwarded``
STATS_FIELDS = ("samples", "prefills", "visual_tokens_input", "visual_tokens_llm", "visual_tokens_layer_mean",
                "selection_time_s", "scoring_time_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.allow_abbrev = False  # '--model' must not pass for '--model_args', nor '--output' for '--output_path'
    parser.epilog = ("Other arguments go to `lmms_eval eval` unchanged, e.g. --include_path DIR --batch_size 8 "
                     "--limit 100 --log_samples.")
    parser.add_argument("--model_args", required=True,
                        help="pretrained=<id or path>,method=<name>,<method fields>,dtype=...,device=... "
                             "(see docs/lmms_eval.md)")
    parser.add_argument("--tasks", required=True, help="comma-separated lmms-eval task or group names")
    parser.add_argument("--output_path", default="runs/eval",
                        help="where lmms-eval writes results (default %(default)s)")
    parser.add_argument("--num_processes", type=positive_int, default=1,
                        help="data-parallel processes (torchrun), one GPU each, or CPU processes (default 1)")


def model_arg(model_args: str, key: str) -> str | None:
    found = re.search(rf"(?:^|,){key}=([^,]*)", model_args)
    return found.group(1) if found else None


def lmms_command(args: argparse.Namespace, model_args: str) -> list[str]:
    lmms = ["-m", "lmms_eval", "eval", "--model", "vtoken", "--model_args", model_args, "--tasks", args.tasks,
            "--output_path", str(args.output_path), *args.forwarded]
    if args.num_processes > 1:  # torchrun, not `accelerate launch`: the latter runs a single process without GPUs
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(args.num_processes), *lmms]
    return [sys.executable, *lmms]


def newest_results(output_path: Path, since: float) -> Path | None:
    found = [p for p in output_path.rglob("*_results.json") if p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def metric_values(entry: dict) -> dict[str, float]:
    """``{"exact_match,none": 0.5, "exact_match_stderr,none": 0.1, "alias": ...}`` -> the finite metric values."""
    out = {}
    for key, value in entry.items():
        name = key.split(",")[0]
        if name == "alias" or "_stderr" in name or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


def check_results(results: dict, tasks: list[str]) -> list[str]:
    """One line per requested task (or group) without a finite metric."""
    problems = []
    for task in tasks:
        entry = results.get("results", {}).get(task) or results.get("groups", {}).get(task)
        if not entry:
            problems.append(f"{task}: no results (lmms-eval failed on it; see its log above)")
        elif not metric_values(entry):
            problems.append(f"{task}: no finite metric in {entry}")
    return problems


def format_table(results: dict, tasks: list[str]) -> str:
    rows = [("task", "metric", "value", "stderr")]
    for task in tasks:
        entry = results.get("results", {}).get(task) or results.get("groups", {}).get(task) or {}
        for key, value in metric_values(entry).items():
            name, _, filt = key.partition(",")
            stderr = entry.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
            shown = name if filt in ("", "none") else f"{name} ({filt})"
            rows.append((task, shown, f"{value:.4f}",
                         f"{stderr:.4f}" if isinstance(stderr, (int, float)) and math.isfinite(stderr) else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def read_stats(path: str) -> dict | None:
    """The model's visual-token tally; under data parallelism the per-rank files are added up."""
    root, ext = os.path.splitext(path)
    files = [path] if os.path.exists(path) else sorted(glob.glob(f"{glob.escape(root)}.rank*{ext}"))
    if not files:
        return None
    total = None
    for file in files:
        with open(file) as f:
            stats = json.load(f)
        if total is None:
            total = stats
        else:
            for key in STATS_FIELDS:
                total[key] += stats[key]
    return total


def format_stats(stats: dict) -> str:
    n = max(stats["samples"], 1)
    before, llm, layers = (stats[k] / n for k in ("visual_tokens_input", "visual_tokens_llm",
                                                  "visual_tokens_layer_mean"))
    config = ",".join(f"{k}={v}" for k, v in stats["config"].items())
    ratio = f" ({100 * layers / before:.1f}% of the prompt's)" if before else ""
    return (f"method {stats['method']}{':' + config if config else ''}: visual tokens per sample {before:.1f} in the "
            f"prompt, {llm:.1f} into the LLM, {layers:.1f} averaged over decoder layers{ratio}; "
            f"{stats['samples']} samples in {stats['prefills']} prefills")


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("lmms_eval") is None:
        print("vtoken eval: lmms-eval is not installed; pip install 'vtoken[eval]'", file=sys.stderr)
        return 2
    if not any(ep.name == "vtoken" for ep in importlib.metadata.entry_points(group="lmms_eval.models")):
        print("vtoken eval: lmms-eval cannot see --model vtoken (no 'lmms_eval.models' entry point); reinstall "
              "vtoken, e.g. pip install -e .", file=sys.stderr)
        return 2
    if "--model" in args.forwarded:
        print("vtoken eval: --model is always vtoken; choose the vtoken method in --model_args", file=sys.stderr)
        return 2
    output = Path(args.output_path)
    model_args = args.model_args
    stats_path = model_arg(model_args, "stats_path")
    if stats_path is None:
        stats_path = str((output / f"vtoken_stats_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}.json").resolve())
        model_args = f"{model_args},stats_path={stats_path}"
    batch_size = model_arg(model_args, "batch_size")
    if batch_size is not None:  # lmms-eval passes its --batch_size (default 1) to the model too: move it there
        if "--batch_size" in args.forwarded:
            print("vtoken eval: give the batch size once, as --batch_size N or batch_size=N in --model_args",
                  file=sys.stderr)
            return 2
        model_args = re.sub(r"(^|,)batch_size=[^,]*", "", model_args).strip(",")
        args.forwarded += ["--batch_size", batch_size]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]

    start = time.time()
    code = subprocess.call(lmms_command(args, model_args))
    found = newest_results(output, start - 1) if output.exists() else None
    if found is None:
        print(f"vtoken eval: FAILED: lmms-eval (exit code {code}) wrote no results file under {output}; "
              "see its log above", file=sys.stderr)
        return code or 1
    results = json.loads(found.read_text())
    print()
    print(format_table(results, tasks))
    stats = read_stats(stats_path)
    if stats is not None:
        print(format_stats(stats))
    print(f"results: {found}")
    problems = check_results(results, tasks)
    if problems or code:
        print(f"vtoken eval: FAILED (lmms-eval exit code {code}):\n  " + "\n  ".join(problems), file=sys.stderr)
        return code or 1
    return 0

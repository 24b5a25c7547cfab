"""``vtoken quality``: accuracy against visual-token budget for every LLaVA method, on a shipped ShapesVQA model
(``--task hard``, the default: ShapesVQA-Hard, whose model learned its attention from the answers alone; or
``--task shapes``: ShapesVQA, whose decoder was taught where to look).

Speed does not depend on weights, accuracy does: this is the project's real accuracy measure, small enough for a
CPU. Each method runs through ``vtoken.patch`` and the model's own ``generate()``, exactly as a user would call it.
A ``--method`` may carry its own arguments (``transprune:iga=false``); one that sets ``keep`` itself
(``corematching:keep=none``, the adaptive threshold) runs once, in the "own budget" column.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass

from tqdm.auto import tqdm

import vtoken
from vtoken.cli import usage_errors
from vtoken.evals.common.arguments import add_threads_argument, checkpoint_dir, fractions, positive_int
from vtoken.evals.common.machine import describe_machine, machine_line, set_threads
from vtoken.evals.common.methods import (
    budget_config,
    budget_field,
    llava_methods,
    method_config,
    parse_method,
    spec_label,
)
from vtoken.evals.shapes.model import TASKS, load_task_model

BUDGETS = (1.0, 0.5, 0.25, 0.1, 0.05)
# measured by default besides every method at every budget: TransPrune's TTV alone (which the paper reports as
# competitive) and CoreMatching's adaptive threshold (its own budget)
VARIANTS = ("transprune:iga=false", "corematching:keep=none")


def quality_jobs(methods: list[str], budgets: list[float]) -> list[tuple[str, str, float | None, dict]]:
    """(label, method, budget, config) per measurement: every budget, or once when the method's own arguments set
    its budget (``keep``, TokenFLEX's ``num_tokens``, clustering's ``num_clusters``; budget None)."""
    jobs = []
    for text in methods:
        name, overrides = parse_method(text)
        label = spec_label(name, overrides)
        if budget_field(name) in overrides:
            jobs.append((label, name, None, overrides))
        else:
            jobs += [(label, name, b, {**budget_config(name, b), **overrides}) for b in budgets]
    return jobs


def relative(accuracy: float, dense: float) -> float:
    """``accuracy`` as a fraction of dense accuracy (NaN when dense is 0, e.g. an untrained model)."""
    return accuracy / dense if dense else float("nan")


@dataclass
class Row:
    method: str
    budget: float | None  # None: the method's own (its arguments set keep)
    config: dict
    accuracy: float
    per_type: dict
    visual_tokens: float  # visual tokens per sample, averaged over the decoder layers that see them
    n: int
    label: str = ""  # the method and its own arguments

    def __post_init__(self):
        self.label = self.label or self.method

    def as_dict(self, dense: Row) -> dict:
        out = dict(self.__dict__)
        out["relative_accuracy"] = relative(self.accuracy, dense.accuracy)
        return out


class TokenMeter:
    """Averages, over every prefill, the visual tokens each decoder layer sees (the cost-relevant count: an
    in-LLM method keeps them all at first, then fewer)."""

    def __init__(self, model, handle):
        self.handle, self.values, self.seen = handle, [], -1
        self.hook = model.register_forward_hook(self._after)

    def _after(self, module, args, output):
        stats = self.handle.stats
        if stats.prefills != self.seen and stats.visual_tokens_per_layer:
            self.seen = stats.prefills
            per_sample = zip(*stats.visual_tokens_per_layer)
            self.values += [statistics.mean(layers) for layers in per_sample]

    def close(self) -> float:
        self.hook.remove()
        return statistics.mean(self.values) if self.values else float("nan")


def evaluate_method(model, processor, examples, method: str | None, budget: float | None, batch_size: int,
                    progress: bool = True, config: dict | None = None, label: str = "") -> Row:
    """Accuracy of ``method`` at ``budget`` (``config``: its full arguments instead of the budget's)."""
    from vtoken.evals.shapes.evaluate import evaluate
    from vtoken.evals.shapes.model import num_visual_tokens

    desc = "dense" if method is None else f"{label or method} {budget if budget is None else f'{budget:g}'}"
    if method is None:
        result = evaluate(model, processor, examples, batch_size=batch_size, progress=progress, desc=desc)
        return Row("dense", 1.0, {}, result.accuracy, result.per_type, float(num_visual_tokens(model)), result.n)
    config = budget_config(method, budget) if config is None else config
    with vtoken.patch(model, method, **config) as handle:
        meter = TokenMeter(model, handle)
        try:
            result = evaluate(model, processor, examples, batch_size=batch_size, progress=progress, desc=desc)
        finally:
            tokens = meter.close()
    return Row(method, budget, config, result.accuracy, result.per_type, tokens, result.n, label)


def run_quality(model, processor, examples, methods: list[str], budgets: list[float], batch_size: int = 50,
                progress: bool = True) -> tuple[Row, list[Row]]:
    dense = evaluate_method(model, processor, examples, None, 1.0, batch_size, progress=False)
    rows = []
    for label, method, budget, config in tqdm(quality_jobs(methods, budgets), desc="quality", disable=not progress):
        rows.append(evaluate_method(model, processor, examples, method, budget, batch_size, progress=False,
                                    config=config, label=label))
    return dense, rows


def format_table(dense: Row, rows: list[Row], budgets: list[float]) -> str:
    """Accuracy per method and budget: ``acc (% of dense, visual tokens per sample)``."""
    columns = list(budgets) + ([None] if any(r.budget is None for r in rows) else [])
    head = ["method"] + [f"keep {100 * b:g}%" if b is not None else "own budget" for b in columns]
    lines = [head]
    for label in dict.fromkeys(r.label for r in rows):
        cells = [label]
        for b in columns:
            r = next((r for r in rows if r.label == label and r.budget == b), None)
            if r is not None:
                share = 100 * relative(r.accuracy, dense.accuracy)
                cells.append(f"{100 * r.accuracy:.1f} ({share:.0f}%, {r.visual_tokens:.0f} tok)")
            else:
                cells.append("")
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    fmt = lambda row: " | ".join(c.ljust(w) for c, w in zip(row, widths))
    table = "\n".join([fmt(lines[0]), "-+-".join("-" * w for w in widths), *map(fmt, lines[1:])])
    return f"dense: {100 * dense.accuracy:.1f}% with {dense.visual_tokens:.0f} visual tokens\n{table}"


def plot(dense: Row, rows: list[Row], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, ScalarFormatter

    fig, ax = plt.subplots(figsize=(8.5, 4.4))
    colors, markers = plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2], "osD^v<>ph*"
    for i, label in enumerate(dict.fromkeys(r.label for r in rows)):  # every method its own colour and marker
        mine = sorted((r for r in rows if r.label == label), key=lambda r: r.visual_tokens)
        ax.plot([r.visual_tokens for r in mine], [100 * r.accuracy for r in mine], marker=markers[i % len(markers)],
                color=colors[i % len(colors)], label=label)
    ax.axhline(100 * dense.accuracy, color="k", ls="--", lw=1, label=f"dense ({dense.visual_tokens:.0f} tokens)")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 10, 20, 50, 100, 200 as plain numbers
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.minorticks_off()
    ax.set_xlabel("visual tokens per sample (averaged over decoder layers)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, not over the curves
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_methods(methods: list[str], budget: float) -> None:
    """Every ``--method`` is refused before any work unless :func:`method_config` takes it."""
    with usage_errors():
        for text in methods:
            method_config(text, budget)


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """``--task`` and ``--model``, shared with ``vtoken demo``."""
    # hard by default: its model learned attention from the answers alone and its scenes do not saturate diversity
    # selection, so it separates methods that ShapesVQA ranks together (docs/shapes_vqa.md, "The demo")
    parser.add_argument("--task", choices=tuple(TASKS), default="hard",
                        help="; ".join(f"{k}: {t.title}" for k, t in TASKS.items()))
    parser.add_argument("--model", type=checkpoint_dir, default=None,
                        help="a checkpoint directory trained on --task (default: the one shipped for it)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_task_arguments(parser)
    parser.add_argument("--method", action="append", default=None, metavar="NAME[:key=value,...]",
                        help="method to measure (repeatable); default: every LLaVA method "
                             f"({', '.join(llava_methods())}) and {', '.join(VARIANTS)}")
    parser.add_argument("--budgets", type=fractions, default=",".join(map(str, BUDGETS)),
                        help="fractions of the visual tokens kept, comma-separated")
    parser.add_argument("--n", type=positive_int, default=400, help="test questions")
    parser.add_argument("--batch-size", type=positive_int, default=50, help="questions per generate() call")
    add_threads_argument(parser)
    parser.add_argument("--json", default="quality.json", help="write the results here")
    parser.add_argument("--plot", default="quality.png", help="write the accuracy-vs-tokens plot here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    threads = set_threads(args.threads)
    budgets = args.budgets
    methods = args.method or [*llava_methods(), *VARIANTS]
    check_methods(methods, budgets[0])
    task = TASKS[args.task]
    with usage_errors():
        model, processor = load_task_model(args.task, args.model)
    examples = task.data.make_split("test", args.n)
    dense, rows = run_quality(model, processor, examples, methods, budgets, args.batch_size, not args.quiet)
    machine = describe_machine("cpu", threads)
    title = f"{task.title} test (n={args.n}): accuracy (% of dense, visual tokens per sample)"
    print(title)
    print(machine_line(machine))
    print(threads.line())
    print(format_table(dense, rows, budgets))
    with open(args.json, "w") as f:
        json.dump({"title": title, "task": args.task, "machine": machine, "n": args.n, "dense": dense.as_dict(dense),
                   "results": [r.as_dict(dense) for r in rows]}, f, indent=2)
    plot(dense, rows, f"{title}\n{machine_line(machine)}", args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0

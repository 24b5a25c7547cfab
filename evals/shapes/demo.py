"""``vtoken demo``: the main job. On a shipped ShapesVQA model (ShapesVQA-Hard unless ``--task shapes``), a few
methods at a few budgets: accuracy, visual tokens, prefill latency and speed-up vs dense in one table, and a picture
of which tokens each method kept."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from tqdm.auto import tqdm

import vtoken
from vtoken.cli import usage_errors
from vtoken.evals.bench.llava import measure
from vtoken.evals.common.arguments import add_threads_argument, fractions, positive_int
from vtoken.evals.common.machine import describe_machine, machine_line, set_threads
from vtoken.evals.shapes.model import TASKS, load_task_model
from vtoken.evals.shapes.quality import add_task_arguments, check_methods, evaluate_method, quality_jobs, relative
from vtoken.methods.baselines import pooled_grid

METHODS = ("todre", "random", "pool", "attn_topk", "transprune", "corematching")
BUDGETS = (0.25, 0.1)


def prefill_ms(model, inputs: dict, method: str | None, config: dict, repeats: int) -> float:
    """Median time to first token of one batch (vision encoding included), warm-up excluded."""
    handle = None if method is None else vtoken.patch(model, method, **config)
    try:
        measure(model, inputs, 1, model.device)
        return statistics.median(measure(model, inputs, 1, model.device)[0] for _ in range(repeats))
    finally:
        if handle is not None:
            handle.remove()


def kept_patches(model, inputs: dict, method: str, config: dict) -> tuple[torch.Tensor | None, str]:
    """Which patches of the first image reach the LLM's last layers: an (h, w) mask (None for pooling) + a note."""
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    one = {k: v[:1] for k, v in inputs.items()}
    with vtoken.patch(model, method, **config) as handle, torch.no_grad():
        model(**one)
        stats = handle.stats
        mask = torch.zeros(side * side, dtype=torch.bool)
        note = ""
        if stats.visual_alive:  # in-LLM pruning: LLM-input positions of the survivors of the last stage
            layer = max(stats.visual_alive)
            ids = one["input_ids"][0]
            first = int((ids == model.config.image_token_id).nonzero()[0])
            mask[torch.tensor(stats.visual_alive[layer][0], dtype=torch.long) - first] = True
            note = f"after layer {layer}"
        elif stats.kept_indices and stats.kept_indices[0] is not None:
            mask[stats.kept_indices[0]] = True
        else:
            r, c = pooled_grid(side, side, stats.visual_tokens_kept[0])
            return None, f"pooled to {r}x{c}"
        removed = [rec for rec in stats.records.values() if rec.get("removed", [False])[0]]
        if removed:
            note = "stage 2: all visual tokens removed late"
    return mask.view(side, side), note


def draw_overlay(example_image, panels: list[tuple[str, torch.Tensor | None, str]], side: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    image = np.asarray(example_image.convert("RGB")).astype(float) / 255.0
    cell = image.shape[0] / side
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.6 * (len(panels) + 1), 3.0))
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    for ax, (label, mask, note) in zip(axes[1:], panels):
        shown = image.copy()
        if mask is not None:
            dim = np.kron(~mask.numpy(), np.ones((round(cell), round(cell))))[: image.shape[0], : image.shape[1]]
            shown = shown * (1 - 0.75 * dim[..., None])
            kept = int(mask.sum())
        else:
            r, c = map(int, note.split()[-1].split("x"))
            for i in range(1, r):
                ax.axhline(i * image.shape[0] / r, color="yellow", lw=0.8)
            for j in range(1, c):
                ax.axvline(j * image.shape[1] / c, color="yellow", lw=0.8)
            kept = r * c
        ax.imshow(shown)
        ax.set_title(f"{label}: {kept} tokens\n{note}".strip(), fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # two-line panel titles stay inside the image
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=positive_int, default=200, help="test questions per setting")
    parser.add_argument("--method", action="append", default=None, help=f"default: {', '.join(METHODS)}")
    parser.add_argument("--budgets", type=fractions, default=",".join(map(str, BUDGETS)),
                        help="fractions of visual tokens kept")
    parser.add_argument("--batch-size", type=positive_int, default=50, help="questions per generate() call")
    parser.add_argument("--latency-batch", type=positive_int, default=16,
                        help="questions in the batch timed for prefill")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed prefills per setting (median)")
    add_threads_argument(parser)
    add_task_arguments(parser)
    parser.add_argument("--png", default="vtoken_demo.png", help="kept-token overlay")
    parser.add_argument("--json", default=None, help="also write the table (and the machine) to this JSON file")


def run(args: argparse.Namespace) -> int:
    from vtoken.evals.shapes.evaluate import prompt_inputs

    start = time.perf_counter()
    threads = set_threads(args.threads)
    methods = args.method or list(METHODS)
    budgets = args.budgets
    check_methods(methods, budgets[0])
    task = TASKS[args.task]
    with usage_errors():
        model, processor = load_task_model(args.task, args.model)
    examples = task.data.make_split("test", args.n)
    timed = prompt_inputs(processor, examples[: args.latency_batch], model.device, model.dtype)
    jobs = quality_jobs(methods, budgets)  # (label, method, budget, config); budget None: the method's own
    jobs = [job for b in budgets for job in jobs if job[2] == b] + [job for job in jobs if job[2] is None]
    rows = []
    for label, method, budget, config in tqdm([("dense", None, 1.0, {})] + jobs, desc="demo"):
        row = evaluate_method(model, processor, examples, method, budget, args.batch_size, progress=False,
                              config=config, label=label)
        rows.append((row, prefill_ms(model, timed, method, config, args.repeats)))
    dense, dense_ms = rows[0]

    print(f"{task.title} test, n={args.n}; prefill = time to first token of a batch of {args.latency_batch} "
          f"(vision included), median of {args.repeats}")
    machine = describe_machine(model.device, threads)
    print(machine_line(machine))
    print(threads.line())
    head = ("method", "keep", "visual tokens", "accuracy", "% of dense", "prefill ms", "speed-up")
    lines = [head]
    for row, ms in rows:
        keep = "own" if row.budget is None else f"{100 * row.budget:g}%"
        lines.append((row.label, keep, f"{row.visual_tokens:.0f}", f"{100 * row.accuracy:.1f}",
                      f"{100 * relative(row.accuracy, dense.accuracy):.0f}%", f"{ms:.1f}", f"{dense_ms / ms:.2f}x"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print(" | ".join(c.ljust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))

    example = examples[0]
    one = prompt_inputs(processor, [example], model.device, model.dtype)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    panels = []
    for label, method, budget, config in jobs:
        if budget in (budgets[0], None):
            mask, note = kept_patches(model, one, method, config)
            panels.append((label if budget is None else f"{label} {100 * budget:g}%", mask, note))
    draw_overlay(example.image, panels, side, args.png)
    print(f"wrote {args.png} (kept tokens for: {example.question} -> {example.answer})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"task": args.task, "n": args.n, "machine": machine, "latency_batch": args.latency_batch,
                       "repeats": args.repeats,
                       "results": [{**row.as_dict(dense), "prefill_ms": ms, "speedup": dense_ms / ms}
                                   for row, ms in rows]}, f, indent=2)
        print(f"wrote {args.json}")
    if threads.warning:
        print(threads.warning, file=sys.stderr)
    print(f"demo took {time.perf_counter() - start:.0f} s")
    return 0

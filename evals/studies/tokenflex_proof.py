"""``vtoken tokenflex-proof``: does training with random token counts beat training with a fixed count?

TokenFLEX's claim, checked on ShapesVQA's shipped model (a 14 x 14 = 196-token patch grid): three projectors are
trained on the frozen model's vision tower and decoder with the same step budget and the same data (every step's
scenes and questions are the same for the three; only N differs):

* TokenFLEX, N drawn each step from ``--flex-counts`` (default 16, 36, 64, 100, equal weights);
* fixed N = 36 and fixed N = 100 (``--fixed``).

Each is evaluated at every ``--eval-counts`` N (default 16, 36, 64, 100, 196) through ``vtoken.patch(model,
"tokenflex", num_tokens=N, projector=...)`` and the model's own ``generate()``, beside training-free methods at equal
token counts: ``pool`` and ``todre`` (keep = N) and TokenFLEX's training-free mode (the model's own projector on the
pooled grid). The claim holds if TokenFLEX is within 1 point of each fixed-N projector at that projector's N and
better than every fixed-N projector at every other N.

All three start from one projector aligned to the model's own (the trainer's alignment stage: ``--align-steps`` of
regressing the model's projector on the full grid, no LLM pass), a cheap stand-in for the paper's alignment
pre-training, which a CPU budget cannot afford: from a random start, 150 steps of answer loss left the projector at
chance. The data reuses ``train_shapes``' pieces (the frozen tower's cached outputs, packed question turns);
training is the library's :func:`vtoken.training.train_tokenflex`. Writes a table, JSON and a PNG plot; the trained
projectors go to ``--projectors`` (float16) and are reused with ``--reuse``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import vtoken
from vtoken.adapters.bridges.llava_tokenflex import feature_widths
from vtoken.evals.common.arguments import (
    add_threads_argument,
    checkpoint_dir,
    comma_list,
    non_negative_int,
    positive_int,
)
from vtoken.evals.common.machine import describe_machine, machine_line, set_threads
from vtoken.evals.shapes.model import num_visual_tokens
from vtoken.methods.tokenflex import TokenFlexProjector
from vtoken.training import token_counts_arg

ASSET_DIR = Path(__file__).parent / "assets" / "tokenflex"
BASELINES = ("pool", "todre")


def square(text: str) -> int:
    from vtoken.methods.tokenflex import grid_side

    value = positive_int(text)
    try:
        grid_side(value, "count")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=positive_int, default=1000, help="optimizer steps per projector")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="scenes per step")
    parser.add_argument("--turns", type=positive_int, default=12, help="questions per scene, packed in one sequence")
    parser.add_argument("--scenes", type=positive_int, default=2000, help="training scenes (tower outputs cached)")
    parser.add_argument("--lr", type=float, default=2e-3, help="projector learning rate")
    parser.add_argument("--align-steps", type=non_negative_int, default=400,
                        help="alignment steps first (regress the model's own projector on the full grid; no LLM)")
    parser.add_argument("--warmup", type=non_negative_int, default=20, help="warm-up steps, then cosine decay")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seeds the projectors and the data")
    parser.add_argument("--flex-counts", type=token_counts_arg, default="16,36,64,100",
                        help="TokenFLEX's token counts, COUNT[:WEIGHT],... (equal weights unless given)")
    parser.add_argument("--fixed", type=comma_list(square), default="36,100", help="fixed-N projectors to train")
    parser.add_argument("--eval-counts", type=comma_list(square), default="16,36,64,100,196",
                        help="token counts every model is evaluated at")
    parser.add_argument("--baselines", type=comma_list(str), default=",".join(BASELINES),
                        help="training-free methods at keep = N")
    parser.add_argument("--n", type=positive_int, default=1000, help="test questions per setting")
    parser.add_argument("--batch", type=positive_int, default=50, help="questions per generate() call")
    parser.add_argument("--projectors", default=str(ASSET_DIR), help="where the trained projectors go (float16)")
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate the projectors already in --projectors (trained with these settings) instead of "
                             "training them again; train only the missing ones")
    parser.add_argument("--model", type=checkpoint_dir, default=None,
                        help="a ShapesVQA checkpoint directory (default: the shipped one)")
    add_threads_argument(parser)
    parser.add_argument("--json", default="tokenflex_proof.json", help="write the results here")
    parser.add_argument("--plot", default="tokenflex_proof.png", help="write the accuracy-vs-N plot here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def shapes_data(model, processor, scenes: int, seed: int, turns: int):
    """A ``train_tokenflex`` data callable: scenes from ``train_shapes``' cache of the frozen tower's outputs, each
    with ``turns`` fresh questions per draw, packed as ``train_shapes`` packs them."""
    from accelerate import Accelerator

    from vtoken.evals.shapes.data import scene_questions
    from vtoken.evals.shapes.training import cache_tower, packed_ids
    from vtoken.training import Sample

    cache_args = argparse.Namespace(scenes=scenes, seed=seed, task="shapes")
    hidden, cached, _ = cache_tower(cache_args, Accelerator(cpu=True), model, processor)

    def draw(rng, batch_size: int):
        index = rng.choice(len(cached), size=batch_size, replace=False)
        return [Sample(*packed_ids(processor.tokenizer, scene_questions(cached[i], rng, turns)), features=hidden[i])
                for i in index]

    return draw


def projector_specs(args) -> dict[str, dict[int, float]]:
    """name -> token-count distribution of each projector to train."""
    specs = {"tokenflex": args.flex_counts}
    specs.update({f"fixed-{n}": {n: 1.0} for n in args.fixed})
    return specs


# What a saved projector must have been trained with to be reused.
SETTINGS = ("steps", "align_steps", "batch_size", "turns", "lr")


def saved_reports(args) -> dict[str, dict]:
    """The projectors in ``--projectors`` that ``--reuse`` can take: trained with this run's settings."""
    from vtoken.cli import UsageError

    found = {}
    for name, counts in projector_specs(args).items():
        path = Path(args.projectors) / name
        if not (path / "training_report.json").is_file():
            continue
        report = json.loads((path / "training_report.json").read_text())
        wanted = {**{k: getattr(args, k) for k in SETTINGS}, "counts": {str(n): w for n, w in counts.items()}}
        differ = [k for k, v in wanted.items() if report.get(k) != v]
        if differ:
            raise UsageError(f"--reuse: {path} was trained with other settings ({', '.join(differ)}); pass the same "
                             "ones, another --projectors folder, or leave out --reuse to train again")
        found[name] = {**report, "path": str(path)}
    return found


def aligned_projector(args, model, data) -> tuple[TokenFlexProjector, float]:
    """The common start of every projector: ``--align-steps`` of the trainer's alignment stage (regressing the
    model's own projector on the full grid), run once; returns it and its CPU seconds."""
    from vtoken.training import TrainConfig, align_to_host

    start = time.process_time()
    torch.manual_seed(args.seed)
    projector = TokenFlexProjector(*feature_widths(model.config))
    config = TrainConfig(batch_size=args.batch_size, lr=args.lr, align_steps=args.align_steps, seed=args.seed)
    losses = align_to_host(projector, model, data, config, num_visual_tokens(model), torch.device("cpu"),
                           not args.quiet)
    if losses:
        tqdm.write(f"aligned: relative squared error {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.4f}")
    return projector, time.process_time() - start


def train_projectors(args, model, processor, skip: dict) -> dict[str, dict]:
    """Train every projector of ``projector_specs`` not in ``skip`` (already trained), from one aligned start."""
    from vtoken.training import TrainConfig, train_tokenflex

    todo = {name: counts for name, counts in projector_specs(args).items() if name not in skip}
    if not todo:
        return {}
    data = shapes_data(model, processor, args.scenes, args.seed, args.turns)
    start_projector, align_cpu = aligned_projector(args, model, data)
    out = {}
    for name, counts in todo.items():
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                             token_counts=counts, seed=args.seed, cpu=True, progress=not args.quiet, save_every=0)
        start = time.perf_counter()
        result = train_tokenflex(model, data, config, projector=copy.deepcopy(start_projector))
        wall = time.perf_counter() - start
        path = result.projector.save(Path(args.projectors) / name, dtype=torch.float16)
        tail = [h["loss"] for h in result.history[-50:]]
        report = {"counts": counts, "steps": args.steps, "align_steps": args.align_steps,
                  "batch_size": args.batch_size, "turns": args.turns, "lr": args.lr,
                  "cpu_seconds": result.cpu_seconds, "align_cpu_seconds_shared": align_cpu, "wall_seconds": wall,
                  "final_loss": sum(tail) / len(tail)}
        (path / "training_report.json").write_text(json.dumps(report, indent=1))
        out[name] = {**report, "path": str(path)}
        tqdm.write(f"{name}: {args.steps} steps, {result.cpu_seconds:.0f} s CPU ({wall:.0f} s wall), "
                   f"loss {report['final_loss']:.3f}")
    return out


def evaluate_all(args, model, processor, reports: dict) -> list[dict]:
    from vtoken.evals.shapes.data import make_split
    from vtoken.evals.shapes.evaluate import evaluate

    examples = make_split("test", args.n)
    jobs = [(name, N) for name in reports for N in args.eval_counts]
    jobs += [("tokenflex (training-free)", N) for N in args.eval_counts]
    jobs += [(method, N) for method in args.baselines for N in args.eval_counts]
    rows = []
    for name, N in tqdm(jobs, desc="evaluating", disable=args.quiet):
        if name in reports:
            handle = vtoken.patch(model, "tokenflex", num_tokens=N, projector=reports[name]["path"])
        elif name.startswith("tokenflex"):
            handle = vtoken.patch(model, "tokenflex", num_tokens=N)
        else:
            handle = vtoken.patch(model, name, keep=N)
        with handle:
            result = evaluate(model, processor, examples, batch_size=args.batch, progress=False)
            tokens = handle.stats.visual_tokens_llm
        rows.append({"model": name, "num_tokens": N, "accuracy": result.accuracy, "per_type": result.per_type,
                     "visual_tokens_llm": sum(tokens) / len(tokens), "trained": name in reports,
                     "correct": "".join("1" if c else "0" for c in result.correct)})
    return rows


def cell(rows: list[dict], name: str, N: int) -> dict:
    return next(r for r in rows if r["model"] == name and r["num_tokens"] == N)


def accuracy(rows: list[dict], name: str, N: int) -> float:
    return cell(rows, name, N)["accuracy"]


def paired_gap(rows: list[dict], a: str, b: str, N: int) -> tuple[float, float]:
    """Accuracy of ``a`` minus ``b`` at N in points, and its standard error over the shared test questions."""
    diff = torch.tensor([int(x) - int(y) for x, y in zip(cell(rows, a, N)["correct"], cell(rows, b, N)["correct"])],
                        dtype=torch.float64)
    return 100 * diff.mean().item(), 100 * (diff.std() / len(diff) ** 0.5).item()


def verdict(rows: list[dict], fixed: list[int], counts: list[int]) -> list[str]:
    """The claim, checked cell by cell: TokenFLEX within 1 point of fixed-N at N, above every fixed-N elsewhere
    (point estimates, on 0.01-point-rounded gaps; the paired standard error says which cells are within noise)."""
    lines = []
    for n in fixed:
        for N in [n] + [N for N in counts if N != n]:
            gap, se = paired_gap(rows, "tokenflex", f"fixed-{n}", N)
            ok = round(gap, 2) >= -1.0 if N == n else round(gap, 2) > 0
            lines.append(f"{'holds' if ok else 'FAILS'}: at N={N} TokenFLEX is {gap:+.2f} ± {se:.2f} points from "
                         f"fixed-{n} (needs {'>= -1' if N == n else '> 0'})")
    return lines


def format_table(rows: list[dict], counts: list[int]) -> str:
    names = list(dict.fromkeys(r["model"] for r in rows))
    lines = [["model (accuracy %)"] + [f"N={N}" for N in counts]]
    for name in names:
        lines.append([name] + [f"{100 * accuracy(rows, name, N):.1f}" for N in counts])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    fmt = lambda line: " | ".join(c.ljust(w) for c, w in zip(line, widths))
    return "\n".join([fmt(lines[0]), "-+-".join("-" * w for w in widths), *map(fmt, lines[1:])])


def plot(rows: list[dict], counts: list[int], dense: float, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.4))
    for name in dict.fromkeys(r["model"] for r in rows):
        trained = next(r["trained"] for r in rows if r["model"] == name)
        ax.plot(counts, [100 * accuracy(rows, name, N) for N in counts], marker="o" if trained else ".",
                ls="-" if trained else ":", lw=2 if name == "tokenflex" else 1.2, label=name)
    ax.axhline(100 * dense, color="k", ls="--", lw=0.8, label="shipped model, 196 tokens")
    ax.set_xscale("log")
    ax.set_xticks(counts)
    ax.set_xticklabels([str(N) for N in counts])
    ax.minorticks_off()  # the log axis' own minor labels (2x10^1, ...) would overlap the counts
    ax.set_xlabel("visual tokens per image (N)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from vtoken.cli import UsageError
    from vtoken.evals.shapes.data import make_split
    from vtoken.evals.shapes.evaluate import evaluate, load_shapes_model

    threads = set_threads(args.threads)
    model, processor = load_shapes_model(args.model)
    native = num_visual_tokens(model)
    if any(N > native for N in [*args.flex_counts, *args.fixed, *args.eval_counts]):
        raise UsageError(f"token counts must be at most {native} (the model's patch grid)")
    if not set(args.fixed) <= set(args.eval_counts):
        raise UsageError(f"--eval-counts {args.eval_counts} must include every --fixed count {args.fixed}: the claim "
                         "compares each fixed-N projector at its own N")
    saved = saved_reports(args) if args.reuse else {}
    trained = train_projectors(args, model, processor, skip=saved)
    reports = {name: saved.get(name) or trained[name] for name in projector_specs(args)}
    dense = evaluate(model, processor, make_split("test", args.n), batch_size=args.batch, progress=False).accuracy
    rows = evaluate_all(args, model, processor, reports)
    machine = describe_machine("cpu", threads)
    first = next(iter(reports.values()))
    title = (f"ShapesVQA test (n={args.n}), frozen ShapesVQA model; projectors trained {first['steps']} steps x "
             f"{first['batch_size']} scenes x {first['turns']} questions each")
    table = format_table(rows, args.eval_counts)
    checks = verdict(rows, args.fixed, args.eval_counts)
    cpu = {name: round(r["cpu_seconds"]) for name, r in reports.items()}
    cpu["alignment (shared)"] = round(first.get("align_cpu_seconds_shared", 0))
    print(title)
    print(machine_line(machine))
    print(threads.line())
    print(f"training CPU time (s, all threads): {cpu}, total {sum(cpu.values())} s")
    print(f"dense (no patch): {100 * dense:.1f}%")
    print(table)
    print("\n".join(checks))
    print(f"claim {'holds' if all(c.startswith('holds') for c in checks) else 'does not hold'} on every cell")
    with open(args.json, "w") as f:
        training = {name: {k: v for k, v in r.items() if k != "path"} for name, r in reports.items()}  # no local paths
        json.dump({"title": title, "machine": machine, "n": args.n, "dense": dense, "training": training,
                   "results": rows, "verdict": checks}, f, indent=2)
    plot(rows, args.eval_counts, dense, f"{title}\n{machine_line(machine)}", args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0

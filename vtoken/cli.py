"""``vtoken`` console script. Each subcommand lives in its own module with ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("vtoken.evals.demo", "the main job: accuracy, tokens and speed of a few methods on the ShapesVQA model"),
    "quality": ("vtoken.evals.quality", "accuracy vs visual-token budget for every LLaVA method (ShapesVQA)"),
    "methods": ("vtoken.cli", "list the registered methods, their arguments and supported models"),
    "bench": ("vtoken.evals.bench", "dense vs methods on a LLaVA model: prefill latency, decode speed, FLOPs, memory"),
    "bench-dit": ("vtoken.evals.bench_dit", "SVG2 vs dense attention on video-DiT shapes: speed, recall, error"),
    "bench-vit": ("vtoken.evals.bench_vit", "ViT images/s dense vs token clustering, plus feature fidelity"),
    "train-shapes": ("vtoken.evals.train_shapes", "train the ShapesVQA LLaVA (the shipped accuracy model) on CPU"),
    "eval": ("vtoken.evals.eval_cli", "lmms-eval tasks with --model vtoken; fails unless every task has metrics"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="also print each argument's default")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import vtoken

    hosts = vtoken.hosts()
    for name, info in sorted(vtoken.methods().items()):
        supported = ", ".join(hosts[h].description if h in hosts else h for h in info.hosts)
        print(f"{name:18s} {info.summary}")
        print(f"{'':18s} models: {supported}")
        if args.verbose:
            for field, default in info.fields().items():
                shown = "required" if default is dataclasses.MISSING else repr(default)
                print(f"{'':20s}{field} = {shown}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtoken", description="Make vision models spend fewer tokens.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, add_help=False)  # -h: the real parser below
    args, _ = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    # Re-parse with the command's real arguments, now that its module is loaded.
    parser = argparse.ArgumentParser(prog=f"vtoken {args.command}", description=COMMANDS[args.command][1])
    module.add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    rest = argv[argv.index(args.command) + 1 :]
    if getattr(module, "FORWARDS_UNKNOWN_ARGS", False):  # a wrapper hands what it does not parse to the tool it runs
        parsed, forwarded = parser.parse_known_args(rest)
        parsed.forwarded = forwarded
    else:
        parsed = parser.parse_args(rest)
    return int(module.run(parsed) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""``vtoken`` console script. Each subcommand lives in its own module with ``add_arguments`` and ``run``.

A mistake in the command line ends like argparse's own errors: ``vtoken <cmd>: error: <message>`` on stderr and
exit code 2. Values that can be judged alone are checked while parsing (``vtoken.evals.common.arguments``); a command
raises :class:`UsageError` for the rest, or runs its checks of the user's request under :func:`usage_errors`.
Any other exception is a bug and keeps its traceback. ``--debug`` (before or after the command) shows the traceback
of usage errors too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("vtoken.evals.shapes.demo",
             "the main job: accuracy, tokens and speed of a few methods on a ShapesVQA model"),
    "quality": ("vtoken.evals.shapes.quality",
                "accuracy vs visual-token budget for every LLaVA method (ShapesVQA-Hard or ShapesVQA)"),
    "methods": ("vtoken.cli", "list the registered methods, their arguments and supported models"),
    "bench": ("vtoken.evals.bench.llava",
              "dense vs methods on a LLaVA model: prefill latency, decode speed, FLOPs, memory"),
    "overhead": ("vtoken.evals.bench.overhead", "aten ops and device->host syncs per prefill and decode step, dense vs "
                                                "methods (what a GPU at batch 1 pays on the host)"),
    "bench-dit": ("vtoken.evals.bench.dit", "SVG2 vs dense attention on video-DiT shapes: speed, recall, error"),
    "bench-vit": ("vtoken.evals.bench.vit", "ViT images/s dense vs token clustering, plus feature fidelity"),
    "bench-kernels": ("vtoken.evals.bench.kernels", "each fused Triton kernel vs its PyTorch reference (GPU timings)"),
    "probe-position": ("vtoken.evals.shapes.probe", "how well each vision-tower layer of a ShapesVQA model "
                                                    "still knows where each patch is (linear read-out)"),
    "train-shapes": ("vtoken.evals.shapes.training", "train the ShapesVQA LLaVA (the shipped accuracy model) on CPU"),
    "replay-shapes": ("vtoken.evals.shapes.replay", "retrain a ShapesVQA model from its training report: every run "
                                                    "of its chain, oldest first"),
    "eval": ("vtoken.evals.lmms.cli", "lmms-eval tasks with --model vtoken; fails unless every task has metrics"),
    "train-tokenflex": ("vtoken.training", "train a TokenFLEX projector (any visual-token count) for a LLaVA on JSONL"),
    "tokenflex-proof": ("vtoken.evals.studies.tokenflex_proof", "TokenFLEX vs fixed-N projectors on ShapesVQA: "
                                                                "train, evaluate, table and plot"),
}
DEBUG_HELP = "on a usage error, show the full traceback instead of the one-line message"


class UsageError(Exception):
    """The user asked for something that cannot be done: ``vtoken`` prints the message and exits 2."""


@contextmanager
def usage_errors() -> Iterator[None]:
    """Checks of the user's request run inside: the ValueError they raise (the library's way of rejecting bad
    input: unknown methods, config fields out of range) becomes a :class:`UsageError`."""
    try:
        yield
    except ValueError as error:
        raise UsageError(str(error)) from error


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless it has none worth showing (None, an off flag) or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default is None or action.default is False or "default" in help_text.lower():
            return help_text
        return super()._get_help_string(action)


def command_parser(name: str) -> argparse.ArgumentParser:
    """The full parser of ``vtoken <name>`` (imports the command's module)."""
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"vtoken {name}", description=COMMANDS[name][1],
                                     formatter_class=HelpFormatter)
    module.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser


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
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="vtoken", description="Make vision models spend fewer tokens.",
                                     epilog="`vtoken COMMAND -h` lists a command's options and their defaults.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, add_help=False)  # -h: the real parser below
    args, _ = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # Re-parse with the command's real arguments, now that its module is loaded.
    module = importlib.import_module(COMMANDS[args.command][0])
    parser = command_parser(args.command)
    rest = argv[argv.index(args.command) + 1 :]
    if getattr(module, "FORWARDS_UNKNOWN_ARGS", False):  # a wrapper hands what it does not parse to the tool it runs
        parsed, forwarded = parser.parse_known_args(rest)
        parsed.forwarded = forwarded
    else:
        parsed = parser.parse_args(rest)
    try:
        return int(module.run(parsed) or 0)
    except UsageError as error:
        if args.debug or parsed.debug:
            raise
        parser.error(str(error))  # usage, "vtoken <cmd>: error: ...", exit 2


if __name__ == "__main__":  # python -m vtoken.cli: run the imported module, whose UsageError the commands raise
    from vtoken.cli import main as vtoken_main

    sys.exit(vtoken_main())

"""CoreMatching's decode speed against ``beta`` and the set of layers whose FFN runs only the core neurons.

``python -m vtoken.evals.studies.corematching_sweep`` builds the ``vtoken bench`` model (default: tiny-llava-1.5, random
weights, CPU), measures dense and every (layer set, beta) pair in one interleaved run (``run_bench``), prints the
decode and prefill speed-ups as tables and writes JSON + a PNG. Token selection is the same in every row (same
``keep``, same ``layer``), so the rows differ only in decode FFN sparsity; ``ffn_layers=none`` is the token-pruning
baseline.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from vtoken.cli import UsageError, usage_errors
from vtoken.evals.bench.llava import check_installs, run_bench
from vtoken.evals.bench.models import add_model_arguments, build_model, check_model, synthetic_inputs
from vtoken.evals.common.arguments import (
    DTYPES,
    add_threads_argument,
    comma_list,
    device,
    dtype_name,
    non_negative_int,
    positive_int,
)
from vtoken.evals.common.literals import parse_literal
from vtoken.evals.common.machine import describe_machine, machine_line, set_threads
from vtoken.methods.corematching import CoreMatchingConfig

BETAS = (0.2, 0.4, 0.6, 0.8)
LAYER_SETS = ("none", "default", "all")


def sweep_methods(betas, layer_sets, keep) -> list[tuple[str, dict]]:
    """One CoreMatching config per (layer set, beta); ``none`` needs no beta, so it appears once."""
    methods = []
    for layers in layer_sets:
        for beta in betas if layers != "none" else betas[:1]:
            config = dict(keep=keep, beta=beta, ffn_layers=layers)
            CoreMatchingConfig(**config)  # judge every value before any work
            methods.append(("corematching", config))
    return methods


def format_tables(results: list[dict], betas, layer_sets) -> str:
    """Decode and prefill speed-up over dense, one row per layer set, one column per beta."""
    def cell(layers, beta, key):
        for r in results[1:]:
            cfg = r["config"]
            if cfg["ffn_layers"] == layers and (layers == "none" or cfg["beta"] == beta):
                return f"{r[key]:.2f}x"
        return ""

    out = []
    for key, name in (("decode_speedup", "decode tokens/s over dense"), ("speedup", "prefill speed-up over dense")):
        head = [f"ffn_layers \\ beta ({name})"] + [f"{b:g}" for b in betas]
        lines = [head] + [[layers] + [cell(layers, b, key) for b in betas] for layers in layer_sets]
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        out += [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines[:1]]
        out.append("-+-".join("-" * w for w in widths))
        out += [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines[1:]] + [""]
    dense = results[0]
    out.append(f"dense: prefill {dense['ttft_ms']:.1f} ms, decode {dense['decode_tok_s']:.1f} tokens/s; visual tokens "
               f"{results[1]['visual_tokens_llm']:.0f} -> {results[1]['visual_tokens_last_layer']:.0f} (last layer)")
    return "\n".join(out)


def plot(results: list[dict], betas, layer_sets, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for layers in layer_sets:
        rows = [r for r in results[1:] if r["config"]["ffn_layers"] == layers]
        if layers == "none":
            ax.axhline(rows[0]["decode_speedup"], color="gray", ls=":", label="ffn_layers=none (tokens only)")
            continue
        ax.plot([r["config"]["beta"] for r in rows], [r["decode_speedup"] for r in rows], marker="o",
                label=f"ffn_layers={layers}")
    ax.axhline(1.0, color="k", ls="--", lw=1, label="dense")
    ax.set_xlabel("beta (share of FFN neurons kept for decode)")
    ax.set_ylabel("decode tokens/s over dense")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, "tiny-llava-1.5", "LLaVA / LLaVA-NeXT")
    parser.add_argument("--betas", type=comma_list(float), default=",".join(map(str, BETAS)),
                        help="comma-separated betas")
    parser.add_argument("--layer-sets", type=comma_list(str), default=",".join(LAYER_SETS),
                        help="comma-separated ffn_layers values (none, default, all, a-b)")
    parser.add_argument("--keep", type=parse_literal, default=None,
                        help="CoreMatching's token budget (none: the adaptive threshold)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per setting (median reported)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs per setting first")
    parser.add_argument("--new-tokens", type=positive_int, default=32, help="tokens generated per run")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", type=dtype_name, default=None, help="default: float16 on CUDA, else fp32")
    parser.add_argument("--attn", default="sdpa", help="attention implementation")
    add_threads_argument(parser)
    parser.add_argument("--json", default="corematching_sweep.json", help="write the results here")
    parser.add_argument("--plot", default="corematching_sweep.png", help="write the PNG here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    threads = set_threads(args.threads)
    device_ = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device_.type == "cuda" else torch.float32)
    with usage_errors():
        methods = sweep_methods(args.betas, args.layer_sets, args.keep)
        check_model(args.model)
    model = build_model(args.model, dtype=dtype, device=str(device_), attn=args.attn,
                        random_weights=args.random_weights)
    with usage_errors():
        check_installs(model, methods)
    inputs = synthetic_inputs(model)
    results, _ = run_bench(model, inputs, methods, repeats=args.repeats, warmup=args.warmup,
                           new_tokens=args.new_tokens, progress=not args.quiet)
    machine = describe_machine(device_, threads)
    title = (f"CoreMatching decode sparsity on {args.model}, keep={args.keep}, {args.new_tokens} new tokens, "
             f"{str(dtype).split('.')[-1]}, {args.attn}")
    print(title)
    print(machine_line(machine))
    print(threads.line())
    print(format_tables(results, args.betas, args.layer_sets))
    with open(args.json, "w") as f:
        json.dump({"title": title, "machine": machine, "settings": vars(args) | {"dtype": str(dtype)},
                   "results": results}, f, indent=2, default=str)
    plot(results, args.betas, args.layer_sets, f"{title}\n{machine_line(machine)}\n{threads.line()}", args.plot)
    print(f"wrote {args.json} and {args.plot}")
    if threads.warning:
        print(threads.warning, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtoken.evals.studies.corematching_sweep",
                                     description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as error:
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())

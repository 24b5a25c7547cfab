"""``vtoken bench-kernels``: each fused kernel against its PyTorch reference, at the sizes the methods meet.

Kernels: ragged compaction (DecoderPruner, after an in-LLM decision), attention-row scoring (attn_topk's last row,
ToDRE stage 2's text rows), greedy diversity selection (ToDRE / DivPrune stage 1) and the greedy MAP of a DPP
(CDPruner). Sizes: ``llava-1.5``
(576 visual tokens in a 641-token prompt, LLaMA-7B width 4096, 32 heads x 128) and ``llava-next`` (2,880 visual
tokens, the AnyRes count of a 672x672 image before unpadding). Both paths run through the same dispatch call the
library makes (``backend="torch"`` / ``"triton"``), so the times include what a call really costs, and every row says
whether the two outputs agree.

Triton timings need a CUDA GPU. On a CPU the command times the references only, unless ``--smoke`` runs tiny
sizes through Triton's interpreter: that checks the kernels and the command, and its times are not speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vtoken.cli import UsageError
from vtoken.evals.common.arguments import DTYPES, add_threads_argument, comma_list, device, dtype_name, positive_int
from vtoken.evals.common.machine import describe_machine, machine_line, set_threads
from vtoken.evals.common.timing import median_ms

TEXT_TOKENS = 65  # a LLaVA conversation prompt around the image


@dataclass(frozen=True)
class Size:
    visual: int
    width: int  # hidden size: rows compacted, features selected from
    heads: int
    kv_heads: int
    head_dim: int
    keep: int  # visual tokens a method keeps (compaction, greedy selection)
    text_rows: int  # ToDRE stage 2's text query rows

    @property
    def prompt(self) -> int:
        return self.visual + TEXT_TOKENS


SIZES = {
    "llava-1.5": Size(576, 4096, 32, 32, 128, 64, 64),
    "llava-next": Size(2880, 4096, 32, 32, 128, 288, 64),
    "smoke": Size(48, 64, 4, 2, 32, 8, 6),
}


@dataclass
class Result:
    kernel: str
    case: str
    size: str
    batch: int
    reference_ms: float
    triton_ms: float | None  # None: not run (no GPU)
    speedup: float | None
    agree: str  # "exact", "max abs diff ...", or "-" when Triton did not run
    ok: bool = True  # exact where the kernel must be (compaction, selection), within rounding for scoring




def agreement(kernel: str, ref, got) -> tuple[str, bool]:
    """How the Triton output compares with the reference's, and whether that is acceptable: compaction must match
    exactly; scores may differ by rounding (fp32 sums in another order); a greedy selection may part at a near-tie
    of fp32 sums computed in another order (the matrix-vector loop vs the Gram matrix; the DPP's batched products vs
    the kernel's running sums), in at most 1% of its picks."""
    refs, gots = (ref, got) if isinstance(ref, tuple) else ((ref,), (got,))
    if all(torch.equal(r, g) for r, g in zip(refs, gots)):
        return "exact", True
    if kernel in ("greedy selection", "dpp greedy map"):
        differ = sum(int(torch.isin(r, g, invert=True).sum()) for r, g in zip(ref, got))  # kept sets, per image
        return f"{differ} of {ref.numel()} kept tokens differ", differ <= 0.01 * ref.numel()
    diff = max(float((r.float() - g.float()).abs().max()) for r, g in zip(refs, gots))
    close = all(torch.allclose(g.float(), r.float(), rtol=1e-3, atol=1e-6) for r, g in zip(refs, gots))
    return f"max abs diff {diff:.2e}", close and kernel == "attention scoring"


def ragged_keep(batch: int, size: Size, device, gen: torch.Generator) -> torch.Tensor:
    """Every text token plus about ``size.keep`` visual ones per sample, a different count in each sample."""
    keep = torch.ones(batch, size.prompt, dtype=torch.bool)
    start = TEXT_TOKENS - 24  # the image sits after the system prompt, as in LLaVA's template
    for b in range(batch):
        n = max(1, size.keep - b)  # ragged: filler slots in every sample but the first
        visual = torch.zeros(size.visual, dtype=torch.bool)
        visual[torch.randperm(size.visual, generator=gen)[:n]] = True
        keep[b, start : start + size.visual] = visual
    return keep.to(device)


def cases(size: Size, batch: int, device, dtype, gen: torch.Generator):
    """(kernel, case, call(backend)) for each measurement at this size and batch."""
    from vtoken.kernels.attention import attention_received
    from vtoken.kernels.compaction import compact
    from vtoken.kernels.diversity import greedy_select
    from vtoken.kernels.dpp import dpp_greedy_map

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    hidden = rand(batch, size.prompt, size.width)
    keep = ragged_keep(batch, size, device, gen)
    positions = torch.arange(size.prompt, device=device).expand(batch, -1)
    yield ("compaction", f"{size.prompt} -> ~{size.keep + TEXT_TOKENS} rows",
           lambda backend: compact(hidden, keep, positions, backend))

    q_all = rand(batch, size.heads, size.text_rows, size.head_dim)
    k = rand(batch, size.kv_heads, size.prompt, size.head_dim)
    valid = torch.ones(batch, size.prompt, dtype=torch.bool, device=device)
    last = torch.full((batch, 1), size.prompt - 1, device=device)
    text = torch.arange(size.prompt - size.text_rows, size.prompt, device=device).expand(batch, -1)
    scale = size.head_dim**-0.5
    for name, rows, q in (("last row (attn_topk)", last, q_all[:, :, :1]),
                          (f"{size.text_rows} text rows (ToDRE stage 2)", text, q_all)):
        weights = torch.full(rows.shape, 1.0 / rows.shape[1], device=device)
        yield ("attention scoring", f"{name}, {size.prompt} keys",
               lambda backend, q=q, rows=rows, w=weights: attention_received(q, k, w, scale, rows, valid,
                                                                             backend=backend))

    features = F.normalize(rand(batch, size.visual, size.width).float(), dim=-1).to(dtype)
    pivots = torch.zeros(batch, dtype=torch.long, device=device)
    yield ("greedy selection", f"{size.keep} of {size.visual} (max-sum)",
           lambda backend: greedy_select(features, size.keep, pivots, "maxsum", backend))

    x = features.float()
    relevance = torch.rand(batch, size.visual, generator=gen).to(device) + 0.1
    kernel = relevance[:, :, None] * (x @ x.transpose(1, 2)) * relevance[:, None, :]  # CDPruner's, always fp32
    yield ("dpp greedy map", f"{size.keep} of {size.visual} (CDPruner)",
           lambda backend: dpp_greedy_map(kernel, size.keep, backend))


def run_benchmark(sizes: list[str], batches: list[int], device: torch.device, dtype: torch.dtype, reps: int,
                  with_triton: bool) -> list[Result]:
    """Reference and (``with_triton``) Triton per case; speed-ups only on a GPU (the interpreter's times are not)."""
    gen = torch.Generator().manual_seed(0)
    results = []
    for name in sizes:
        for batch in batches:
            for kernel, case, call in cases(SIZES[name], batch, device, dtype, gen):
                ref_ms, ref = median_ms(lambda call=call: call("torch"), reps, device)
                triton_ms, agree, ok = None, "-", True
                if with_triton:
                    triton_ms, got = median_ms(lambda call=call: call("triton"), reps, device)
                    agree, ok = agreement(kernel, ref, got)
                speedup = ref_ms / triton_ms if triton_ms is not None and device.type == "cuda" else None
                results.append(Result(kernel, case, name, batch, ref_ms, triton_ms, speedup, agree, ok))
                print(f"  {kernel}: {case}, {name}, batch {batch} done", file=sys.stderr)
    return results


def table(results: list[Result], triton_label: str) -> str:
    head = ("kernel", "case", "size", "batch", "reference ms", f"{triton_label} ms", "speed-up", "outputs")
    rows = [head, tuple("-" * len(h) for h in head)]
    for r in results:
        rows.append((r.kernel, r.case, r.size, str(r.batch), f"{r.reference_ms:.3f}",
                     "needs a GPU" if r.triton_ms is None else f"{r.triton_ms:.3f}",
                     "-" if r.speedup is None else f"{r.speedup:.1f}x", r.agree))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:N]")
    parser.add_argument("--sizes", type=comma_list(str), default=None,
                        help=f"comma-separated, of {', '.join(s for s in SIZES if s != 'smoke')} "
                             "(default: both; --smoke: a tiny size)")
    parser.add_argument("--batch", type=comma_list(positive_int), default=None,
                        help="comma-separated batch sizes (default: 1,16 on CUDA, 1 on CPU)")
    parser.add_argument("--dtype", type=dtype_name, default=None,
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--reps", type=positive_int, default=20, help="timed calls per measurement (median)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes; on a CPU also run the Triton kernels in the interpreter (a check, no speed)")
    add_threads_argument(parser)
    parser.add_argument("--out", default=None, help="folder for bench_kernels.json and bench_kernels.md")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    sizes = args.sizes or (["smoke"] if args.smoke else ["llava-1.5", "llava-next"])
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise UsageError(f"--sizes {','.join(unknown)}: unknown; choose from {', '.join(SIZES)}")
    batches = args.batch or ([1, 16] if device.type == "cuda" and not args.smoke else [1])
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    threads = set_threads(args.threads)
    interpreted = device.type == "cpu" and args.smoke
    if interpreted:  # must be set before the kernels' @triton.jit runs, i.e. before their modules are imported
        os.environ["TRITON_INTERPRET"] = "1"
    from vtoken.kernels.dispatch import triton_available

    with_triton = triton_available() and (device.type == "cuda" or interpreted)
    info = describe_machine(device, threads)
    print(machine_line(info))
    print(threads.line())
    if device.type != "cuda":
        print("no GPU: Triton timings need a CUDA device; " + (
            "--smoke runs the Triton kernels in the CPU interpreter (a correctness check; its times are not speeds)"
            if interpreted else "only the PyTorch references are timed (--smoke also checks the Triton kernels)"))
    results = run_benchmark(sizes, batches, device, dtype, args.reps, with_triton)
    label = "Triton (interpreter)" if interpreted else "Triton"
    text = table(results, label)
    print(f"{str(dtype).removeprefix('torch.')}, median of {args.reps} calls after one warm-up")
    print(text)
    disagree = [r for r in results if not r.ok]
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = {"machine": info, "dtype": str(dtype), "reps": args.reps, "interpreter": interpreted,
                  "results": [asdict(r) for r in results]}
        (out / "bench_kernels.json").write_text(json.dumps(report, indent=2))
        (out / "bench_kernels.md").write_text(
            f"# vtoken bench-kernels\n\n{machine_line(info)}; {str(dtype).removeprefix('torch.')}, median of "
            f"{args.reps} calls\n\n{text}\n")
        print(f"wrote {out / 'bench_kernels.json'} and {out / 'bench_kernels.md'}")
    if disagree:
        print(f"error: Triton and reference outputs differ: {[(r.kernel, r.case) for r in disagree]}", file=sys.stderr)
        return 1
    return 0

"""``vtoken bench``: dense vs each method, side by side in one run, on one model.

Per method: visual tokens entering the LLM, prefill latency (time to first token, vision encoding included;
median over repeats, warm-up excluded), decode tokens/s, peak memory, analytic prefill FLOPs and the method's own
overhead (boundary selection and in-LLM scoring), reported separately. Repeats are interleaved across methods so
that a change of machine load hits every method alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

import vtoken
from vtoken.adapters import _compat
from vtoken.cli import usage_errors
from vtoken.evals.bench.flops import prefill_flops
from vtoken.evals.bench.memory import PeakMemory
from vtoken.evals.bench.models import (
    PRESETS,
    add_model_arguments,
    build_model,
    check_model,
    synthetic_inputs,
    views_per_sample,
)
from vtoken.evals.bench.roofline import Peak, device_peak, ideal_ms
from vtoken.evals.common.arguments import (
    DTYPES,
    add_threads_argument,
    budget,
    device,
    dtype_name,
    non_negative_int,
    positive_float,
    positive_int,
)
from vtoken.evals.common.machine import describe_machine, machine_line, set_threads
from vtoken.evals.common.methods import method_config

SDPA_KERNELS = ("auto", "flash", "efficient", "cudnn", "math")


def sdpa_kernel(name: str):
    """Restrict PyTorch's SDPA to one backend (``auto``: PyTorch picks per call)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend
    from torch.nn.attention import sdpa_kernel as restrict

    return restrict({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                     "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name])


def check_installs(model, methods: list[tuple[str, dict]]) -> None:
    """Install and remove each method once, so that one this model cannot take fails before anything is timed."""
    for name, config in methods:
        try:
            vtoken.patch(model, name, **config).remove()
        except ValueError as error:
            raise ValueError(f"--method {name} (config {config}) on --model: {error}") from None


class TowerTokens:
    """The tokens each vision-tower block sees in the first forward (the prefill): clustering inside the tower
    makes the later blocks cheaper, and the FLOPs count has to know."""

    def __init__(self, model):
        tower = getattr(model.model, "vision_tower", None)
        blocks = [] if tower is None else _compat.vision_blocks(tower)  # Qwen-VL: none counted
        self.counts: list[int] = []
        self.hooks = [block.register_forward_pre_hook(self._seen, with_kwargs=True) for block in blocks]
        self.blocks = len(blocks)

    def _seen(self, module, args, kwargs):
        if len(self.counts) < self.blocks:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.counts.append(hidden.shape[1])

    def __enter__(self) -> TowerTokens:
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()


class Stamps(LogitsProcessor):
    """Timestamps each generation step: the first call happens right after prefill, the rest after each decode. On
    CUDA each stamp is an event recorded in the stream (no sync during the run, which would add host stalls of its
    own); the times are read once the run is over."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.events: list = []
        self.times: list[float] = []  # seconds since the start (filled by ``read``)

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)  # before the run: what came before is not timed
            self.events = [torch.cuda.Event(enable_timing=True)]
            self.events[0].record()
        else:
            self.t0 = time.perf_counter()

    def __call__(self, input_ids, scores):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        else:
            self.times.append(time.perf_counter() - self.t0)
        return scores

    def read(self) -> list[float]:
        if self.cuda:
            self.events[-1].synchronize()
            self.times = [self.events[0].elapsed_time(e) / 1000.0 for e in self.events[1:]]
        return self.times


@dataclass
class Row:
    method: str
    config: dict
    visual_tokens_llm: float = 0.0
    visual_tokens_last: float = 0.0  # in the last decoder layer (in-LLM pruning leaves fewer there)
    ttft_ms: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    selection_ms: list[float] = field(default_factory=list)
    scoring_ms: list[float] = field(default_factory=list)
    peak_mem_mb: float = float("nan")
    flops: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)
    ideal_ms: float = math.nan  # roofline ideal of one prefill (NaN: no peak figures for this device)
    warmup_runs: int = 0
    compiled_while_timed: int = 0  # graphs Dynamo compiled during the timed runs: their times include compiling

    def summary(self, dense: Row | None) -> dict:
        ttft = statistics.median(self.ttft_ms)
        out = {
            "method": self.method,
            "config": self.config,
            "visual_tokens_llm": self.visual_tokens_llm,
            "visual_tokens_last_layer": self.visual_tokens_last,
            "ttft_ms": ttft,
            "ttft_ms_all": self.ttft_ms,
            # the spread of the repeats: the middle half, and the extremes
            "ttft_ms_quartiles": quartiles(self.ttft_ms),
            "ttft_ms_range": [min(self.ttft_ms), max(self.ttft_ms)],
            "decode_tok_s": statistics.median(self.decode_tok_s) if self.decode_tok_s else float("nan"),
            "peak_mem_mb": self.peak_mem_mb,
            "prefill_gflops": self.flops.get("total", float("nan")) / 1e9,
            # NaN: not measured (dense; a method that works inside the vision tower, whose cost is in the prefill)
            "selection_ms": statistics.median(self.selection_ms) if self.selection_ms else math.nan,
            "scoring_ms": statistics.median(self.scoring_ms) if self.scoring_ms else math.nan,
            "records": self.records,
            "ideal_ms": self.ideal_ms,
            "warmup_runs": self.warmup_runs,
            "compiled_while_timed": self.compiled_while_timed,
        }
        out["overhead_pct_of_prefill"] = 100.0 * (out["selection_ms"] + out["scoring_ms"]) / ttft
        if dense is not None:
            out["speedup"] = statistics.median(dense.ttft_ms) / ttft
            out["flops_ratio"] = dense.flops["total"] / self.flops["total"]
            out["decode_speedup"] = out["decode_tok_s"] / statistics.median(dense.decode_tok_s)
            out["ideal_speedup"] = dense.ideal_ms / self.ideal_ms  # NaN without peak figures
            out["of_ideal"] = out["speedup"] / out["ideal_speedup"]
            out["of_flops_ideal"] = out["speedup"] / out["flops_ratio"]  # compute-bound ideal (CPU)
        return out


COMPILE_BACKENDS = ("cudagraphs", "reduce-overhead", "eager")
# A compiled part records its CUDA graph only on a call after the one that compiled it, so a warm-up ends once this
# many runs in a row compiled nothing; it runs at most this many more than asked.
QUIET_RUNS = 2
EXTRA_WARMUP = 5
RECOMPILE_LIMIT = 64  # graphs per compiled part in one bench: two per method that prunes inside the LLM, a few more


def compile_parts(model, how: str) -> dict:
    """The vision tower's and the language model's ``forward``, each compiled once for a whole bench (module ->
    compiled function): ``how`` = "cudagraphs" (CUDA graphs over aten's own kernels: the host's launches go, the GPU
    work stays the same), "reduce-overhead" (Inductor's kernels with CUDA graphs) or "eager" (Dynamo alone, to test
    it on a CPU). One compiled function per part for every row, so that the rows share its graphs (every boundary
    method hands the decoder the same shapes) instead of compiling anew."""
    options = {"mode": how} if how == "reduce-overhead" else {"backend": how}
    decoder, tower = _compat.decoder_of(model.model)
    return {part: torch.compile(type(part).forward.__get__(part), dynamic=False, **options)
            for part in (tower, decoder)}


@contextlib.contextmanager
def compiled(parts: dict | None):
    """Each compiled function (``compile_parts``) as its module's ``forward`` for the block, so that the vision
    encoding, the prefill and every decode step run them; a method's selection between the two and vtoken's
    bookkeeping stay eager, while a method's pruning inside the LLM is traced into the decoder's graph (a decision
    whose count depends on the data masks the tokens it drops instead of removing them). Whatever ``forward`` an
    instance held before (a method's own, bound to the same code) is put back on the way out."""
    saved = {part: vars(part).get("forward") for part in parts or {}}
    for part, fn in (parts or {}).items():
        part.forward = fn
    try:
        # Each prefill length and each method that prunes inside the LLM has graphs of its own: past Dynamo's default
        # of 8 per function, a row would silently run eager.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT) if parts else contextlib.nullcontext():
            yield
    finally:
        for part, own in saved.items():
            if own is None:
                del part.forward
            else:
                part.forward = own


def measure(model, inputs: dict, new_tokens: int, device: torch.device, cache: str = "dynamic",
            disable_compile: bool = False) -> tuple[float, float]:
    """(time to first token in ms, decode tokens/s) of one greedy generate(); ``cache="static"`` takes transformers'
    static cache, whose decode steps generate() compiles on a GPU (torch.compile with CUDA graphs), unless
    ``disable_compile`` (the model's parts are ``compiled`` already, or the run needs no speed)."""
    stamps = Stamps(device)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    if disable_compile:
        extra["disable_compile"] = True
    stamps.start()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([stamps]),
                       pad_token_id=model.config.text_config.pad_token_id or 0, **extra)
    times = stamps.read()
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return times[0] * 1000.0, decode


def run_bench(model, inputs: dict, methods: list[tuple[str, dict]], repeats: int = 5, warmup: int = 1,
              new_tokens: int = 16, progress: bool = True, peak: Peak | None = None,
              cache: str = "dynamic", compile_with: str | None = None) -> tuple[list[dict], Row]:
    device = model.device
    rows = [Row("dense", {})] + [Row(name, cfg) for name, cfg in methods]
    views = views_per_sample(inputs) * inputs["input_ids"].shape[0]
    if compile_with is not None:
        torch._dynamo.reset()  # graphs of this bench only
    parts = None if compile_with is None else compile_parts(model, compile_with)

    @contextlib.contextmanager
    def applied(row: Row):
        """The row's method (None for dense) for one or more runs."""
        handle = None if row.method == "dense" else vtoken.patch(model, row.method, **row.config)
        try:
            yield handle
        finally:
            if handle is not None:
                handle.remove()

    def run() -> tuple[float, float]:
        with compiled(parts):  # a second compile around the compiled decoder would nest
            return measure(model, inputs, new_tokens, device, cache, disable_compile=parts is not None)

    total = len(rows) * (warmup + repeats + 1)
    bar = tqdm(total=total, desc="bench", disable=not progress)
    for row in rows:  # warm-up, FLOPs and token counts from the first call, peak memory in its own call
        with applied(row) as handle:
            if parts is not None:  # a compiled tower would not run hooks added after it was compiled
                with TowerTokens(model) as tower:
                    measure(model, inputs, 1, device, cache, disable_compile=True)  # the prefill alone, eager
            row.warmup_runs = warm_up(run, warmup, bar)
            # hooks registered after the method's (compiled: the eager prefill above counted the tower's tokens)
            with (TowerTokens(model) if parts is None else contextlib.nullcontext(tower) as tower,
                  PeakMemory(device) as mem):
                run()
            bar.update()
            row.peak_mem_mb = mem.peak_mb
            row.flops, row.visual_tokens_llm, row.records = flops_of(model, inputs, handle, views, tower.counts)
            if peak is not None:
                row.ideal_ms = ideal_ms(row.flops["parts"], peak, model.dtype.itemsize)
            stats = llm_stats(handle)
            row.visual_tokens_last = (statistics.mean(stats.visual_tokens_per_layer[-1]) if stats is not None
                                      else row.visual_tokens_llm)
    for _ in range(repeats):
        for row in rows:
            with applied(row) as handle:
                (ttft, decode), graphs = counting_compiles(run)
                row.compiled_while_timed += graphs
                stats = llm_stats(handle)
                if stats is not None:
                    row.selection_ms.append(stats.selection_time_s * 1000.0)
                    row.scoring_ms.append(stats.scoring_time_s * 1000.0)
            row.ttft_ms.append(ttft)
            row.decode_tok_s.append(decode)
            bar.update()
    bar.close()
    dense = rows[0]
    return [row.summary(None if row is dense else dense) for row in rows], dense


def counting_compiles(run: Callable[[], object]) -> tuple[object, int]:
    """``run()``'s result, and how many graphs Dynamo compiled during it."""
    before = _compat.compiled_graphs()
    result = run()
    return result, _compat.compiled_graphs() - before


def warm_up(run: Callable[[], object], runs: int, bar=None) -> int:
    """Call ``run`` ``runs`` times, then on until the last ``QUIET_RUNS`` of them (or all, if fewer were asked)
    compiled no graph, at most ``EXTRA_WARMUP`` more: a fixed count can stop while a compiled part is still
    compiling or recording its graphs. Returns how many runs it made."""
    done = quiet = 0
    while done < runs or (quiet < min(runs, QUIET_RUNS) and done < runs + EXTRA_WARMUP):
        quiet = 0 if counting_compiles(run)[1] else quiet + 1
        done += 1
        if bar is not None and done <= runs:
            bar.update()
    return done


def warmup_line(results: list[dict], asked: int) -> str:
    """``3 warm-up runs``, or the range each row took when some ran on until they compiled nothing."""
    runs = sorted({row["warmup_runs"] for row in results})
    if runs == [asked]:
        return f"{asked} warm-up runs"
    span = f"{runs[0]}" if len(runs) == 1 else f"{runs[0]}-{runs[-1]}"
    return f"{span} warm-up runs ({asked} asked, then until {QUIET_RUNS} in a row compiled nothing)"


def quartiles(values: list[float]) -> list[float]:
    """[first, third] quartile (the values themselves when there are fewer than four)."""
    if len(values) < 4:
        return [min(values), max(values)]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def llm_stats(handle):
    """The handle's LLM-side statistics (token counts per decoder layer, selection time), or None: dense, or a
    method that stays inside the vision tower (token clustering with reconstruction)."""
    stats = None if handle is None else handle.stats
    return stats if hasattr(stats, "tokens_per_layer") else None


def flops_of(model, inputs: dict, handle, views: int, tower_tokens: list[int]) -> tuple[dict, float, dict]:
    """Per-layer token counts of one prefill -> analytic FLOPs (the dense model counts its own prompt)."""
    mask = inputs["attention_mask"]
    stats = llm_stats(handle)
    tokens = [getattr(model.config, key) for key in ("image_token_id", "video_token_id") if hasattr(model.config, key)]
    if stats is None:
        n = mask.sum(1).tolist()
        visual = torch.isin(inputs["input_ids"], torch.tensor(tokens, device=mask.device)).sum(1).tolist()
        layers = model.config.text_config.num_hidden_layers
        per_layer, projected = [n] * layers, sum(visual)
    else:
        per_layer, visual = stats.tokens_per_layer, stats.visual_tokens_llm
        projected = sum(stats.visual_tokens_in) if stats.visual_tokens_in else sum(visual)
    records = {} if stats is None else {str(k): v for k, v in stats.records.items()}
    grids = [g for key in ("image_grid_thw", "video_grid_thw") if inputs.get(key) is not None
             for g in inputs[key].tolist()] or None
    flops = prefill_flops(model.config, per_layer, views, projected, tower_tokens or None, grids)
    return flops, statistics.mean(visual), records


def row_label(result: dict) -> str:
    """``method key=value,...``: two configs of one method stay apart."""
    config = ",".join(f"{k}={v}" for k, v in result["config"].items())
    return f"{result['method']} {config}".strip()


def visual_cell(result: dict) -> str:
    """Visual tokens entering the LLM, and ``->`` those left in its last layer when in-LLM pruning removed some."""
    first, last = result["visual_tokens_llm"], result.get("visual_tokens_last_layer", result["visual_tokens_llm"])
    return f"{first:.0f}" if round(first) == round(last) else f"{first:.0f}->{last:.0f}"


def format_table(results: list[dict]) -> str:
    head = ("method", "visual->LLM (->last layer)", "prefill ms [quartiles]", "speed-up", "ideal (measured/ideal)",
            "decode tok/s", "decode speed-up", "peak MB", "prefill GFLOPs", "FLOPs ratio (measured/ratio)",
            "overhead ms (% prefill)")
    lines = [head]
    for r in results:
        label = row_label(r)
        overhead = r["selection_ms"] + r["scoring_ms"]  # NaN: not measured
        low, high = r["ttft_ms_quartiles"]
        lines.append((
            label, visual_cell(r), f"{r['ttft_ms']:.1f} [{low:.1f}-{high:.1f}]", f"{r.get('speedup', 1.0):.2f}x",
            "-" if math.isnan(r.get("ideal_speedup", math.nan)) else
            f"{r['ideal_speedup']:.2f}x ({r['of_ideal']:.2f})",
            f"{r['decode_tok_s']:.1f}", f"{r.get('decode_speedup', 1.0):.2f}x", f"{r['peak_mem_mb']:.0f}",
            f"{r['prefill_gflops']:.1f}",
            f"{r['flops_ratio']:.2f}x ({r['of_flops_ideal']:.2f})" if "flops_ratio" in r else "1.00x",
            "-" if math.isnan(overhead) else
            f"{overhead:.2f} ({r['overhead_pct_of_prefill']:.1f}%)",
        ))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    fmt = lambda row: " | ".join(cell.ljust(w) for cell, w in zip(row, widths))
    return "\n".join([fmt(lines[0]), "-+-".join("-" * w for w in widths), *map(fmt, lines[1:])])


def plot(results: list[dict], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row_label(r).replace(" ", "\n", 1).replace(",", ",\n") for r in results]
    xs = range(len(results))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, name in zip(axes, ("ttft_ms", "prefill_gflops", "decode_tok_s"),
                             ("prefill latency (ms, lower is better)", "prefill GFLOPs", "decode tokens/s")):
        values = [r[key] for r in results]
        bars = ax.bar(xs, values, color=["#888"] + ["#2a7"] * (len(results) - 1))
        ax.set_title(name, fontsize=10)
        ax.set_xticks(xs, labels, fontsize=7)
        if key == "ttft_ms":
            for bar, r in zip(bars, results):
                ax.annotate(f"{r.get('speedup', 1.0):.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, "tiny-llava-1.5", "LLaVA / LLaVA-NeXT / Qwen-VL")
    parser.add_argument("--method", action="append", default=None, metavar="NAME[:key=value,...]",
                        help="a LLaVA method to compare with dense (repeatable; `vtoken methods` lists them); "
                             "default: todre")
    parser.add_argument("--keep", type=budget, default=64,
                        help="budget for every method: int tokens or fraction (token_clustering: clusters)")
    parser.add_argument("--batch", type=positive_int, default=1, help="images (prompts) per generate() call")
    parser.add_argument("--video", action="store_true",
                        help="Qwen-VL and LLaVA-OneVision models: an 8-frame video per prompt instead of an image")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed runs per method (median and quartiles reported); default: 10 on CUDA, 5 on a CPU")
    parser.add_argument("--warmup", type=non_negative_int, default=None,
                        help="untimed runs per method first (compile, autotune, CUDA graphs); default: 3 on CUDA, 1 "
                             "on a CPU")
    parser.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                        help="static: transformers' static cache, whose decode steps generate() compiles on a GPU "
                             "(torch.compile, CUDA graphs); every method takes it")
    parser.add_argument("--compile", choices=COMPILE_BACKENDS, default=None,
                        help="with --cache static: compile the vision tower and the language model once and run "
                             "every call of them through it (cudagraphs: CUDA graphs over aten's kernels, the host's "
                             "launches gone; reduce-overhead: Inductor's kernels with CUDA graphs; eager: Dynamo "
                             "alone); a method's selection between them and vtoken's bookkeeping stay eager; "
                             "a method that prunes inside the LLM compiles with the decoder; a decision whose count "
                             "depends on the data (corematching keep=None, todre's stage 2) masks the tokens it drops "
                             "there instead of removing them, so the layers after it keep their length)")
    parser.add_argument("--new-tokens", type=positive_int, default=16, help="tokens generated per run (decode speed)")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:N]")
    parser.add_argument("--dtype", type=dtype_name, default=None,
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    parser.add_argument("--sdpa-kernel", choices=SDPA_KERNELS, default="auto",
                        help="with --attn sdpa, run every attention call on this SDPA backend (flash: PyTorch's "
                             "FlashAttention-2 kernels; a call it cannot take fails); auto: PyTorch picks")
    add_threads_argument(parser)
    parser.add_argument("--peak-tflops", type=positive_float, default=None,
                        help="peak FLOP/s (in TFLOP/s) of the device for the roofline ideal (default: the GPU's "
                             "datasheet figure for the dtype; none on a CPU)")
    parser.add_argument("--peak-gbs", type=positive_float, default=None,
                        help="peak memory bandwidth (GB/s) for the roofline ideal, with --peak-tflops")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plot", default=None, help="write a PNG here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    threads = set_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    with usage_errors():  # fail before building a large model
        if args.compile and args.cache != "static":
            raise ValueError(f"--compile {args.compile} needs --cache static: a dynamic cache grows at every step, "
                             "so every step would compile again")
        methods = [method_config(text, args.keep) for text in args.method or ["todre"]]
        check_model(args.model)
        peak, roofline = device_peak(device, dtype, args.peak_tflops, args.peak_gbs)
    model = build_model(args.model, dtype=dtype, device=str(device), attn=args.attn,
                        random_weights=args.random_weights)
    with usage_errors():
        check_installs(model, methods)
    with usage_errors():
        inputs = synthetic_inputs(model, batch=args.batch, video=args.video)
    cuda = device.type == "cuda"
    repeats = args.repeats or (10 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    with sdpa_kernel(args.sdpa_kernel):
        results, _ = run_bench(model, inputs, methods, repeats=repeats, warmup=warmup, new_tokens=args.new_tokens,
                               progress=not args.quiet, peak=peak, cache=args.cache,
                               compile_with=args.compile)
    machine = describe_machine(device, threads)
    preset = PRESETS.get(args.model)
    title = (f"{args.model}: {preset.description if preset else 'checkpoint'}; batch {args.batch}"
             f"{' (videos)' if args.video else ''}, "
             f"prompt {inputs['input_ids'].shape[1]} tokens, {args.dtype or str(dtype).split('.')[-1]}, {args.attn}"
             + (f" ({args.sdpa_kernel} backend only)" if args.sdpa_kernel != "auto" else "")
             + ("; static cache" + (", compiled decode" if cuda and not args.compile else "")
                if args.cache == "static" else "")
             + (f"; vision tower and decoder compiled ({args.compile})" if args.compile else "")
             + f"; median of {repeats} after {warmup_line(results, warmup)}")
    print(title)
    print(machine_line(machine))
    print(threads.line())
    print(f"peak MB: extra memory at the peak of one generate() call ({PeakMemory(device).source})")
    print(roofline)
    print(format_table(results))
    for row in results:
        if row["compiled_while_timed"]:
            print(f"warning: {row['method']} compiled {row['compiled_while_timed']} graphs during its timed runs, "
                  "so its times include compiling (raise --warmup)", file=sys.stderr)
    if threads.warning:
        print(threads.warning, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "machine": machine, "memory_source": PeakMemory(device).source,
                       "settings": vars(args) | {"dtype": str(dtype)}, "roofline": roofline,
                       "results": results}, f, indent=2, default=str)
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, f"{title}\n{machine_line(machine)}\n{threads.line()}", args.plot)
        print(f"wrote {args.plot}")
    return 0

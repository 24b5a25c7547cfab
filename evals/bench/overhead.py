"""``vtoken overhead``: what each method costs the host, counted exactly: aten ops and device->host syncs per prefill
and per decode step, against dense, in one run.

On a GPU at batch 1 every aten op is a kernel launch issued by the host, and every sync (``.item()``, ``.tolist()``,
``nonzero``, boolean indexing, a data-dependent output size) stalls the host until the device has drained its queue.
Both are deterministic, so a CPU counts them as exactly as a GPU would: this is the budget a pruned model must keep
to be faster on a GPU, measured without one.

A ``generate()`` call is cut at each call of the model's forward: the first segment is the prefill and its first
token (vision encoding and generate's own bookkeeping included), each later one a decode step. ``--graphed`` counts
what is left once the vision tower and the language model replay from CUDA graphs (``vtoken bench --compile
cudagraphs``): each call of them is one launch, and a sync inside them, which would break the graph, still counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm.auto import tqdm

import vtoken
from vtoken.adapters import _compat
from vtoken.cli import usage_errors
from vtoken.evals.common.arguments import budget, positive_int
from vtoken.kernels.dispatch import counted_as_graph, watching_launches

# aten ops whose result the host must wait for: a scalar read, or an output whose size depends on the data
SYNC_OPS = frozenset({
    "_local_scalar_dense", "nonzero", "nonzero_numpy", "argwhere", "equal", "masked_select", "unique_consecutive",
    "_unique", "_unique2", "unique_dim", "bincount", "histc",
})
# Python-level reads of a tensor's data that never reach the dispatcher on a CPU tensor
SYNC_FUNCTIONS = frozenset({"tolist", "numpy", "cpu"})


def _is_sync_op(func, args, kwargs) -> bool:
    name = func._schema.name.split("::")[-1]
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave":  # tensor repeats: the output size is their sum, unless output_size gives it
        return func._overloadname != "self_int" and (kwargs or {}).get("output_size") is None
    if name in ("index", "index_put", "index_put_"):  # boolean indexing: a nonzero inside
        indices = args[1] if len(args) > 1 else []
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    return False


def _vtoken_frame() -> str:
    """The innermost vtoken frame of the current stack (where a sync was asked for), else the innermost frame."""
    frames = traceback.extract_stack()[:-3]
    for frame in reversed(frames):
        if "/vtoken/" in frame.filename or "/adapters/" in frame.filename or "/kernels/" in frame.filename:
            folder, name = frame.filename.rsplit("/", 2)[-2:]
            return f"{folder}/{name}:{frame.lineno} {frame.name}"
    frame = frames[-1]
    return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"


class _Segment:
    def __init__(self):
        self.launches: Counter = Counter()
        self.ops = 0
        self.syncs = 0
        self.graph_syncs = 0  # of those, inside a graphed part: each would break its graph
        self.sites: Counter = Counter()

    def sync(self, inside_graph: bool = False) -> None:
        self.syncs += 1
        self.graph_syncs += inside_graph
        self.sites[_vtoken_frame()] += 1


class _Ops(TorchDispatchMode):
    def __init__(self, counter: OpCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.counter.inside_kernel:
            segment = self.counter.current
            segment.ops += not self.counter.inside_graph
            if _is_sync_op(func, args, kwargs):
                segment.sync(self.counter.inside_graph)
        return func(*args, **(kwargs or {}))


class _Reads(TorchFunctionMode):
    def __init__(self, counter: OpCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_FUNCTIONS and args and isinstance(args[0], torch.Tensor) and not self.counter.inside_kernel:
            self.counter.current.sync(self.counter.inside_graph)
        return func(*args, **(kwargs or {}))


class OpCounter:
    """Counts aten ops and syncs of ``model`` per forward call (a new segment starts at each call after the first).
    ``graphed``: submodules whose every call is one launch (a CUDA graph's replay); their syncs still count."""

    def __init__(self, model, graphed=()):
        self.model, self.graphed = model, graphed
        self.segments: list[_Segment] = []
        self.inside_kernel = self.inside_graph = False

    def _replay(self, module, args, kwargs):
        self.current.ops += 1
        self.current.launches["graph replay"] += 1
        self.inside_graph = True
        self._as_graph = counted_as_graph()  # the code inside runs as it does when captured
        self._as_graph.__enter__()

    def _replayed(self, module, args, kwargs, output):
        self.inside_graph = False
        self._as_graph.__exit__(None, None, None)

    @contextlib.contextmanager
    def _launch(self, kernel: str):
        """A Triton launch is one op, whatever Triton's interpreter does on the host to run it on a CPU (none inside a
        graphed part, whose replay is the one launch)."""
        self.current.ops += not self.inside_graph
        self.current.launches[kernel] += 1
        self.inside_kernel = True
        for mode in reversed(self._modes):  # Triton's interpreter must run without them
            mode.__exit__(None, None, None)
        try:
            yield
        finally:
            for mode in self._modes:
                mode.__enter__()
            self.inside_kernel = False

    @property
    def current(self) -> _Segment:
        return self.segments[-1]

    def _next_call(self, module, args, kwargs):
        if self.calls:
            self.segments.append(_Segment())
        self.calls += 1

    def __enter__(self) -> OpCounter:
        self.segments, self.calls = [_Segment()], 0
        self._stack = contextlib.ExitStack()
        self._stack.callback(self.model.register_forward_pre_hook(self._next_call, with_kwargs=True).remove)
        for part in self.graphed:
            self._stack.callback(part.register_forward_pre_hook(self._replay, with_kwargs=True).remove)
            self._stack.callback(part.register_forward_hook(self._replayed, with_kwargs=True).remove)
        self._stack.enter_context(watching_launches(self._launch))
        self._modes = (_Reads(self), _Ops(self))
        for mode in self._modes:
            self._stack.enter_context(mode)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


@dataclass
class Counts:
    """One ``generate()`` call: the prefill with its first token, then every decode step (each step alike)."""

    prefill_ops: int
    prefill_syncs: int
    decode_ops: int  # the most any decode step took
    decode_syncs: int
    steps: int
    prefill_sites: dict = field(default_factory=dict)  # where the prefill's syncs come from (file:line function)
    decode_sites: dict = field(default_factory=dict)
    graph_syncs: int = 0  # syncs inside graphed parts, in the segment with the most (``graphed`` counts only)


def count_generate(model, inputs: dict, new_tokens: int = 4, graphed: bool = False, static: bool = False) -> Counts:
    """Ops and syncs of one greedy ``generate()`` of ``new_tokens`` tokens (no early stop) on a dynamic cache, or a
    ``static`` one; ``graphed``: on a static cache, with each call of the vision tower and of the language model one
    launch."""
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if graphed or static:
        gen["cache_implementation"] = "static"
    parts = _compat.decoder_of(model.model) if graphed else ()
    with torch.no_grad():
        model.generate(**inputs, **gen)  # warm: lazy initialisation is not the method's cost
        with OpCounter(model, parts) as counter:
            model.generate(**inputs, **gen)
    first, steps = counter.segments[0], counter.segments[1:]
    if not steps:
        raise RuntimeError("generate() ran the model once; count with new_tokens >= 2")
    worst = max(steps, key=lambda s: (s.syncs, s.ops))
    return Counts(first.ops, first.syncs, max(s.ops for s in steps), max(s.syncs for s in steps), len(steps),
                  dict(first.sites), dict(worst.sites), max(s.graph_syncs for s in counter.segments))


def count_methods(model, inputs: dict, methods: list[tuple[str, str, dict]], new_tokens: int = 4,
                  progress: bool = True, graphed: bool = False, static: bool = False) -> dict[str, Counts]:
    """``{label: Counts}`` for dense (label "dense") and each (label, method, config)."""
    out = {"dense": count_generate(model, inputs, new_tokens, graphed, static)}
    for label, name, config in tqdm(methods, desc="overhead", disable=not progress):
        with vtoken.patch(model, name, **config):
            out[label] = count_generate(model, inputs, new_tokens, graphed, static)
    return out


def format_table(counts: dict[str, Counts]) -> str:
    dense = counts["dense"]
    head = ("method", "prefill ops", "prefill syncs", "ops / decode step", "syncs / decode step")
    lines = [head]
    for label, c in counts.items():
        pairs = ((c.prefill_ops, dense.prefill_ops), (c.prefill_syncs, dense.prefill_syncs),
                 (c.decode_ops, dense.decode_ops), (c.decode_syncs, dense.decode_syncs))
        lines.append((label, *(f"{value}" if label == "dense" else f"{value} ({value - base:+d})"
                               for value, base in pairs)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    rows = [" | ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    return "\n".join([rows[0], "-+-".join("-" * w for w in widths), *rows[1:]])


def format_sites(counts: dict[str, Counts]) -> str:
    """Where each method's syncs come from, beyond dense's."""
    dense = counts["dense"]
    out = []
    for label, c in counts.items():
        if label == "dense":
            continue
        for phase, sites, base in (("prefill", c.prefill_sites, dense.prefill_sites),
                                   ("decode step", c.decode_sites, dense.decode_sites)):
            extra = {site: n - base.get(site, 0) for site, n in sites.items() if n > base.get(site, 0)}
            for site, n in sorted(extra.items(), key=lambda item: -item[1]):
                out.append(f"  {label}, {phase}: {n} x {site}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ command line
DEFAULT_METHODS = ("random", "pool", "divprune", "tokenflex", "todre", "attn_topk", "transprune", "corematching",
                   "pyramiddrop", "dart", "cdpruner", "visionzip")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vtoken.evals.bench.models import add_model_arguments

    add_model_arguments(parser, "count-llava-1.5", "LLaVA / LLaVA-NeXT / Qwen-VL")
    parser.add_argument("--method", action="append", default=None, metavar="NAME[:key=value,...]",
                        help=f"a method to count against dense (repeatable); default: {', '.join(DEFAULT_METHODS)} "
                             "(those the model takes)")
    parser.add_argument("--keep", type=budget, default=64, help="budget for every method: int tokens or fraction")
    parser.add_argument("--batch", type=positive_int, default=1, help="prompts per generate() call")
    parser.add_argument("--new-tokens", type=positive_int, default=4, help="tokens generated (decode steps + 1)")
    parser.add_argument("--kernels", choices=("triton", "torch"), default=None,
                        help="triton: count the path a GPU runs (every method with a backend uses its Triton kernels, "
                             "each launch one op; on a CPU through Triton's interpreter); torch: the PyTorch "
                             "references. Default: triton wherever it can run (a GPU, or a CPU process that has not "
                             "imported Triton yet or was started with TRITON_INTERPRET=1)")
    parser.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                        help="static: transformers' static cache, eager (generate() compiles its decode steps on a "
                             "GPU; this counts what each step issues before compiling)")
    parser.add_argument("--graphed", action="store_true",
                        help="count each call of the vision tower and of the language model as one launch, as when "
                             "they replay from CUDA graphs (vtoken bench --cache static --compile cudagraphs), on a "
                             "static cache; inside them a decision whose count depends on the data masks the tokens "
                             "it drops instead of reading the count)")
    parser.add_argument("--sites", action="store_true", help="also list where each method's extra syncs come from")
    parser.add_argument("--json", default=None, help="write the counts here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def default_methods(model) -> list[str]:
    host = vtoken.registry.find_host(model)
    return [name for name in DEFAULT_METHODS if host is not None and host.name in vtoken.methods()[name].hosts]


def kernel_path(requested: str | None) -> str:
    """"triton" or "torch": which kernels to count. On a CPU, Triton's interpreter must be switched on before Triton is
    first imported (transformers imports it with its model classes)."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return requested or "triton"
    if "triton" not in sys.modules:
        if requested != "torch":
            os.environ["TRITON_INTERPRET"] = "1"
        return requested or "triton"
    if requested == "triton":
        raise ValueError("--kernels triton on a CPU needs Triton's interpreter, which must be on before Triton is "
                         "imported: start with TRITON_INTERPRET=1, or use --kernels torch")
    return "torch"


def run(args: argparse.Namespace) -> int:
    from vtoken.evals.bench.models import build_model, check_model, synthetic_inputs
    from vtoken.evals.common.methods import budget_config, parse_method, spec_label

    with usage_errors():
        args.kernels = kernel_path(args.kernels)
        check_model(args.model)
    model = build_model(args.model, random_weights=args.random_weights)
    with usage_errors():
        texts = args.method or default_methods(model)
        methods = []
        for text in texts:
            name, overrides = parse_method(text)
            config = {**budget_config(vtoken.registry.get_method(name).name, args.keep), **overrides}
            if args.kernels == "triton" and "backend" in vtoken.methods()[name].fields():
                config.setdefault("backend", "triton")
            vtoken.patch(model, name, **config).remove()  # refused here, before anything is counted
            methods.append((spec_label(name, overrides), name, config))
        inputs = synthetic_inputs(model, batch=args.batch)
        if args.new_tokens < 2:
            raise ValueError("--new-tokens must be at least 2: the first token comes with the prefill")
    counts = count_methods(model, inputs, methods, args.new_tokens, progress=not args.quiet,
                           graphed=args.graphed, static=args.cache == "static")
    layers = len(model.model.language_model.layers)
    print(f"{args.model}: {type(model).__name__}, {layers} decoder layers; batch {args.batch}, prompt "
          f"{inputs['input_ids'].shape[1]} tokens; keep {args.keep}; {args.kernels} kernels; "
          + ("static cache, each call of the vision tower and of the language model one launch (a CUDA graph's "
             "replay); " if args.graphed else "static cache; " if args.cache == "static" else "")
          + "aten ops (a Triton launch counts one) and device->host syncs per generate() segment (prefill = vision + "
          "prefill + first token; decode step = one more token)")
    print(format_table(counts))
    if args.graphed:
        print("syncs inside the tower or the decoder (each would break a graph), most in one segment: "
              + ", ".join(f"{label} {c.graph_syncs}" for label, c in counts.items()))
    if args.sites:
        print(format_sites(counts) or "  no extra syncs")
    if args.json:
        with open(args.json, "w") as f:
            cache = "static" if args.graphed else args.cache  # graphed counts run on a static cache
            json.dump({"model": args.model, "batch": args.batch, "keep": args.keep, "kernels": args.kernels,
                       "decoder_layers": layers, "graphed": args.graphed, "cache": cache,
                       "new_tokens": args.new_tokens, "counts": {k: asdict(v) for k, v in counts.items()}}, f,
                      indent=2)
        print(f"wrote {args.json}")
    return 0

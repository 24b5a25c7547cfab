"""Argument types and checks shared by the ``vtoken`` commands.

A value that can be judged alone is checked by its ``type=`` while argparse parses it, so a mistake is reported as
``vtoken <cmd>: error: argument --x: ...`` before any work; a method's own config does the judging where one
exists, so the command line accepts exactly what ``vtoken.patch`` accepts.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

import vtoken
from vtoken.evals.common.literals import parse_literal

LLAVA_HOSTS = ("llava", "llava_next")
# The command that measures a method on each kind of model, for methods that `vtoken bench` (LLaVA) cannot run.
BENCH_FOR_HOST = {"wan": "bench-dit", "hunyuan_video": "bench-dit", "timm_vit": "bench-vit",
                  "hf_clip_vision": "bench-vit", "open_clip_vit": "bench-vit"}


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def dtype_name(text: str) -> str:
    """A dtype's name (``float16``, or the short ``fp16``): its canonical name, a key of ``DTYPES``."""
    name = DTYPE_ALIASES.get(text, text)
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join([*DTYPES, *DTYPE_ALIASES])}; got {text!r}")
    return name


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads`` as every measuring command takes it (``machine.set_threads`` resolves the default)."""
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: the cores the current load leaves free, at least 1)")


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_float(text: str) -> float:
    return _finite_float(text, lambda v: v > 0.0, "> 0")


def non_negative_float(text: str) -> float:
    return _finite_float(text, lambda v: v >= 0.0, ">= 0")


def _finite_float(text: str, in_range: Callable[[float], bool], bound: str) -> float:
    value = _float(text)
    if not (in_range(value) and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text}")
    return value


def share(text: str) -> float:
    """A fraction in [0, 1]."""
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text}")
    return value


def kept_share(text: str) -> float:
    """A fraction kept, in (0, 1]."""
    return _checked(vtoken.check_budget, _float(text), "share")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def budget(text: str) -> int | float:
    """A token budget: an int (tokens kept, >= 1) or a float in (0, 1] (fraction kept)."""
    return _checked(vtoken.check_budget, parse_literal(text))


def fractions(text: str) -> list[float]:
    """Comma-separated fractions of the visual tokens kept, each in (0, 1]."""
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated fractions in (0, 1], got {item!r}") from None
        values.append(_checked(vtoken.check_budget, value, "budget"))
    return values


def config_field(config_cls: type, field: str, parse: Callable[[str], object] = parse_literal):
    """``type=`` for one field of a method config: the config's own validation judges the value."""

    def check(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {field} value {text!r}") from None
        return getattr(_checked(config_cls, **{field: value}), field)

    check.__name__ = field
    return check


def _checked(check: Callable, *args, **kwargs):
    """``check(...)``, with its ValueError reported as a bad argument."""
    try:
        return check(*args, **kwargs)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def comma_list(item: Callable[[str], object]):
    """``type=`` for a comma-separated list whose items ``item`` parses and checks."""

    def parse(text: str) -> list:
        return [item(part.strip()) for part in text.split(",")]

    parse.__name__ = f"list of {item.__name__}"
    return parse


def device(text: str) -> str:
    """A torch device that exists here (a CUDA one only where torch sees a GPU)."""
    import torch

    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; e.g. cpu, cuda, cuda:1") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: torch sees no CUDA device here; use cpu")
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: the benchmarks run on cpu or cuda")
    return text


def checkpoint_dir(text: str) -> str:
    """A saved Hugging Face model: a folder with a config.json."""
    if not (Path(text) / "config.json").is_file():
        what = "no such folder" if not Path(text).exists() else "no config.json in it"
        raise argparse.ArgumentTypeError(f"{text}: {what}; expected a saved checkpoint (save_pretrained's folder)")
    return text


def not_for_llava(info) -> str:
    """Why ``vtoken bench`` / ``demo`` / ``quality`` cannot run this method, and which command can."""
    hosts = vtoken.hosts()
    supported = "; ".join(hosts[h].description if h in hosts else h for h in info.hosts)
    commands = sorted({BENCH_FOR_HOST[h] for h in info.hosts if h in BENCH_FOR_HOST})
    hint = f"; use {' or '.join(f'vtoken {c}' for c in commands)}" if commands else ""
    return f"{info.name} is not a LLaVA method (it patches: {supported}){hint}"


def llava_method(name: str):
    """The registry entry of a method that patches LLaVA models; a ValueError that says what to do otherwise."""
    methods = vtoken.methods()
    if name not in methods:
        raise ValueError(f"--method {name!r}: unknown method; known methods: {', '.join(sorted(methods))}")
    info = methods[name]
    if not set(info.hosts) & set(LLAVA_HOSTS):
        raise ValueError(f"--method {name}: {not_for_llava(info)}")
    return info

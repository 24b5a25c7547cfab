"""``--method NAME[:key=value,...]`` as every command reads it, and the budget each method takes."""

from __future__ import annotations

import vtoken
from vtoken.evals.common.arguments import LLAVA_HOSTS, llava_method
from vtoken.evals.common.literals import parse_literal


def parse_method(text: str) -> tuple[str, dict]:
    """``todre`` or ``todre:rule=maxmin,stage2=false`` -> (name, overrides)."""
    name, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--method {text!r}: expected key=value after ':', got {item!r}")
        overrides[key.strip()] = parse_literal(value.strip())
    return name.strip(), overrides


def llava_methods() -> list[str]:
    return sorted(name for name, info in vtoken.methods().items() if set(info.hosts) & set(LLAVA_HOSTS))


def spec_label(name: str, overrides: dict) -> str:
    return " ".join([name, ",".join(f"{k}={v}" for k, v in overrides.items())]).strip()


def budget_field(method: str) -> str:
    """The argument that sets ``method``'s visual-token budget: token-pruning methods take it as ``keep``; TokenFLEX
    (training-free) as ``num_tokens``, its share of the patch grid rounded down to a square grid; token clustering as
    ``num_clusters``, the fraction of the patch grid it clusters to, handed to the LLM without reconstruction."""
    fields = vtoken.methods()[method].fields()
    for field in ("keep", "num_tokens", "num_clusters"):
        if field in fields:
            return field
    raise ValueError(f"--method {method!r} has no visual-token budget to set; methods with one: "
                     f"{', '.join(llava_methods())}")


def budget_config(method: str, budget: float) -> dict:
    """The config that gives ``method`` about ``budget`` of the visual tokens (see :func:`budget_field`)."""
    field = budget_field(method)
    return {field: budget, "reconstruct": False} if field == "num_clusters" else {field: budget}


def method_config(text: str, budget: float) -> tuple[str, dict]:
    """``--method`` text -> (name, config): ``budget`` as this method takes it, then the method's own ``key=value``
    arguments; a method that does not patch LLaVA, has no budget or refuses its arguments raises ValueError."""
    name, overrides = parse_method(text)
    info = llava_method(name)
    config = {**budget_config(name, budget), **overrides}
    try:
        vtoken.make_config(info, config)
    except ValueError as error:
        raise ValueError(f"--method {text} (config {config}): {error}") from None
    return name, config

"""Registries of methods and hosts, joined by stages.

A method declares the stages it works at (``register_method``); a host (a model family's adapter) registers how to
install each stage it implements for any method (``register_host``). Neither side names the other: a method runs on
every host that implements all of its stages, and ``vtoken.patch`` installs it with the host's installer of the
method's first stage (which takes the others along). Glue that is specific to one method on one host (a bridge,
``adapters/bridges/``) installs that method there (``add_bridge``), whatever the host's stages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# stage -> where in a model it acts
STAGES = {
    "boundary": "after the multimodal projector: fewer visual tokens reach the LLM",
    "in_llm": "between decoder layers during prefill (and what later decode steps run)",
    "projector": "at the multimodal projector: a chosen number of tokens per view go through it",
    "tower_attention": "reads the vision tower's attention and keys at the layer the projector reads, mapped onto "
                       "the projected tokens (ImageContext.tower)",
    "vision_blocks": "inside a vision transformer's blocks",
    "attention": "in a video diffusion transformer's self-attention processors",
}
Installer = Callable[[Any, Any, Any], None]  # install(model, config, handle)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    config_cls: type
    stages: tuple[str, ...]
    summary: str

    @property
    def hosts(self) -> tuple[str, ...]:
        """The hosts that implement every stage of this method, in registration order."""
        return tuple(name for name, host in host_registry().items() if host.supports(self.name, self.stages))

    def fields(self) -> dict[str, Any]:
        """Config fields and their defaults (what ``vtoken.patch(model, name, **fields)`` accepts)."""
        out = {}
        for f in dataclasses.fields(self.config_cls):
            if not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out[f.name] = dataclasses.MISSING
        return out


@dataclass(frozen=True)
class HostInfo:
    name: str
    description: str
    matches: Callable[[Any], bool]
    installers: dict[str, Installer] = field(default_factory=dict)  # stage -> install(model, config, handle)
    bridges: dict[str, Installer] = field(default_factory=dict)  # method name -> its own install on this host

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(self.installers)

    def supports(self, method: str, stages: tuple[str, ...]) -> bool:
        return method in self.bridges or set(stages) <= set(self.installers)

    def install(self, model: Any, config: Any, handle: Any) -> None:
        install = self.bridges.get(type(config).method_name) or self.installers[type(config).stages[0]]
        install(model, config, handle)


_METHODS: dict[str, MethodInfo] = {}
_HOSTS: dict[str, HostInfo] = {}


def check_stages(stages, what: str) -> tuple[str, ...]:
    unknown = [s for s in stages if s not in STAGES]
    if not stages or unknown:
        raise ValueError(f"{what}: stages must be some of {', '.join(STAGES)}; got {tuple(stages)}")
    return tuple(stages)


def register_method(name: str, stages: tuple[str, ...], summary: str = ""):
    """Class decorator for a method's config dataclass: the stages it works at, first the one that installs it."""

    def deco(cls):
        if name in _METHODS and _METHODS[name].config_cls is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].config_cls.__qualname__}")
        doc = (cls.__doc__ or "").strip().splitlines()
        cls.method_name = name
        cls.stages = check_stages(stages, f"method {name!r}")
        _METHODS[name] = MethodInfo(name, cls, cls.stages, summary or (doc[0] if doc else ""))
        return cls

    return deco


def register_host(name: str, description: str, matches: Callable[[Any], bool],
                  installers: dict[str, Installer]) -> None:
    """A model family an adapter recognises (``matches``) and its installer of each stage it implements for any method
    (none: every method it runs comes from a bridge)."""
    if installers:
        check_stages(tuple(installers), f"host {name!r}")
    _HOSTS[name] = HostInfo(name, description, matches, dict(installers))


def add_bridge(host: str, method: str, install: Installer) -> None:
    """A bridge: how ``method`` installs on the already registered ``host``."""
    if host not in _HOSTS:
        raise ValueError(f"bridge for method {method!r}: no host {host!r} is registered")
    _HOSTS[host].bridges[method] = install


def _load_builtins() -> None:
    # Imported lazily so that ``import vtoken`` stays light and adapters may import the core freely. Every module
    # directly in the adapters' folder is a host adapter that registers itself on import, and every module in
    # ``adapters/bridges/`` a bridge, so a new host or bridge is one new file. The folder is a namespace package
    # (no ``__init__.py``: see docs/design.md, "Top-level names"); ``_``-prefixed modules and sub-packages are
    # shared code, not hosts.
    import importlib
    import pkgutil

    import vtoken.adapters
    import vtoken.adapters.bridges
    import vtoken.methods  # noqa: F401

    for package, pick in ((vtoken.adapters, lambda m: not m.ispkg and not m.name.startswith("_")),
                          (vtoken.adapters.bridges, lambda m: not m.name.startswith("_"))):
        for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if pick(module):
                importlib.import_module(f"{package.__name__}.{module.name}")


def method_registry() -> dict[str, MethodInfo]:
    _load_builtins()
    return dict(_METHODS)


def host_registry() -> dict[str, HostInfo]:
    _load_builtins()
    return dict(_HOSTS)


def get_method(name: str) -> MethodInfo:
    methods = method_registry()
    if not isinstance(name, str) or name not in methods:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(methods))}")
    return methods[name]


def find_host(model: Any) -> HostInfo | None:
    for host in host_registry().values():
        if host.matches(model):
            return host
    return None

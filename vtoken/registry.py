"""Registries of methods (config dataclasses) and hosts (model families an adapter can patch).

Methods live in ``vtoken.methods`` and say which hosts they support; adapters live in ``vtoken.adapters``
and say how to recognise a host and how to install a method on it. ``vtoken.patch`` joins the two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MethodInfo:
    name: str
    config_cls: type
    hosts: tuple[str, ...]
    summary: str

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
    install: Callable[[Any, Any, Any], None]


_METHODS: dict[str, MethodInfo] = {}
_HOSTS: dict[str, HostInfo] = {}


def register_method(name: str, hosts: tuple[str, ...], summary: str = ""):
    """Class decorator for a method's config dataclass."""

    def deco(cls):
        if name in _METHODS and _METHODS[name].config_cls is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].config_cls.__qualname__}")
        doc = (cls.__doc__ or "").strip().splitlines()
        cls.method_name = name
        _METHODS[name] = MethodInfo(name, cls, tuple(hosts), summary or (doc[0] if doc else ""))
        return cls

    return deco


def register_host(name: str, description: str, matches: Callable[[Any], bool]):
    """Function decorator for an adapter's ``install(model, config, handle)``."""

    def deco(install):
        _HOSTS[name] = HostInfo(name, description, matches, install)
        return install

    return deco


def _load_builtins() -> None:
    # Imported lazily so that ``import vtoken`` stays light and adapters may import the core freely. The adapters'
    # folder is a namespace package (no ``__init__.py``: see docs/design.md, "Top-level names"), so each host module
    # registers itself on import here.
    import vtoken.adapters.llava  # noqa: F401
    import vtoken.adapters.qwen_vl  # noqa: F401
    import vtoken.adapters.video_dit  # noqa: F401
    import vtoken.adapters.vit  # noqa: F401
    import vtoken.methods  # noqa: F401


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

"""Public entry points: ``patch``, ``methods``, ``hosts``."""

from __future__ import annotations

import dataclasses
from typing import Any

from vtoken.handle import Handle
from vtoken.registry import HostInfo, MethodInfo, find_host, get_method, host_registry


def patch(model: Any, method: str, **config: Any) -> Handle:
    """Apply ``method`` to this ``model`` instance and return a reversible :class:`Handle`.

    ``config`` are the fields of the method's config dataclass (see ``vtoken.methods()[method].fields()``),
    e.g. ``keep=64`` (tokens kept) or ``keep=0.25`` (fraction kept). The model's own call sites
    (``forward``, ``generate``, pipelines) stay as they are. If installing fails, nothing stays installed.
    """
    info = get_method(method)
    cfg = make_config(info, config)
    host = find_host(model)
    if host is None or host.name not in info.hosts:
        supported = [h for name, h in host_registry().items() if name in info.hosts]
        what = f"a {host.name!r} host" if host is not None else "not a supported host"
        raise ValueError(
            f"method {method!r} does not support {type(model).__name__} ({what}); "
            f"supported: {', '.join(h.description for h in supported)}"
        )
    handle = Handle(model, method, cfg, host.name)
    try:
        host.install(model, cfg, handle)
    except BaseException:
        handle.remove()
        raise
    return handle


def make_config(info: MethodInfo, config: dict[str, Any]):
    """Build a method config, turning a wrong keyword into an error that lists the valid ones."""
    valid = [f.name for f in dataclasses.fields(info.config_cls) if f.init]
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(map(repr, unknown))} for method {info.name!r}; "
            f"valid arguments: {', '.join(valid)}"
        )
    return info.config_cls(**config)


def hosts() -> dict[str, HostInfo]:
    """Registry: host name -> :class:`HostInfo` (which model classes an adapter recognises)."""
    return host_registry()

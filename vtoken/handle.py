"""The object ``vtoken.patch`` returns: everything a method changed on one model instance, and how to undo it."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

# module -> {slot: handle}. Two methods may share a model (e.g. clustering in the vision tower and ToDRE after
# the projector) but never the same slot of the same module. Weak keys: a patched model can still be collected.
_SLOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# module -> number of vtoken hooks on it (see ``Handle.forward_hook``)
_HOOKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MISSING = object()


def _mark_hooked(module: Any) -> None:
    """Make a module's hooks visible to ``torch.compile``.

    TorchDynamo does not guard on a module's hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``), so code
    compiled for another instance of the same class, or for this one before it was patched, would keep running
    without them: the patched model would silently run dense. Every call reads ``module.forward``, which Dynamo does
    guard, so a hooked module carries its own bound ``forward`` in its instance dict while it has vtoken hooks:
    adding the first hook or removing the last one makes compiled code recompile. A new hook on a module already
    hooked is found by the guards on the hooks it replaces (they are reached through the hook dict by hook id).
    """
    count = _HOOKED.get(module, 0)
    if count == 0 and "forward" not in module.__dict__:
        module.__dict__["forward"] = module.forward  # the class's forward, bound: same behaviour
        _HOOKED[module] = 1
    elif count:
        _HOOKED[module] = count + 1


def _unmark_hooked(module: Any) -> None:
    count = _HOOKED.get(module, 0)
    if count > 1:
        _HOOKED[module] = count - 1
    elif count == 1:
        del _HOOKED[module]
        module.__dict__.pop("forward", None)


def _refuse_deepcopy(module: Any):
    """An instance-level ``__deepcopy__`` for patched modules: a copy would carry hooks bound to the original's
    state (running dense, or against the original's tensors), so copying is refused where it starts."""

    def __deepcopy__(memo):
        methods = sorted({h.method for h in _SLOTS.get(module, {}).values()})
        raise RuntimeError(
            f"copy.deepcopy of a {type(module).__name__} patched by vtoken ({', '.join(map(repr, methods))}) is not "
            "supported: the copy would keep hooks bound to the original model. Remove the patch first "
            "(handle.remove()), copy the model, then patch each copy with vtoken.patch."
        )

    __deepcopy__.vtoken_guard = True
    return __deepcopy__


class Handle:
    """A method installed on one model instance.

    ``remove()`` undoes every hook and attribute the method installed, in reverse order, and is idempotent.
    The handle is also a context manager (``with vtoken.patch(...) as h:``). ``stats`` describes the last call.
    """

    def __init__(self, model: Any, method: str, config: Any, host: str):
        self.model = model
        self.method = method
        self.config = config
        self.host = host
        self.stats: Any = None
        self._undo: list[Callable[[], None]] = []
        self._resets: list[Callable[[], None]] = []
        self._updater: Callable[[Any], None] | None = None
        self._active = True

    # -- building the patch (adapters call these) ------------------------------------------------------------
    def claim(self, module: Any, slot: str) -> None:
        """Reserve ``slot`` on ``module`` for this handle; a second method on the same slot is an error."""
        slots = _SLOTS.setdefault(module, {})
        other = slots.get(slot)
        if other is not None:
            same = " (the same method)" if other.method == self.method else ""
            raise ValueError(
                f"{type(module).__name__} is already patched with {other.method!r}{same} at {slot!r}; "
                f"call .remove() on that handle before patching it with {self.method!r}"
            )
        if "__deepcopy__" not in module.__dict__:
            module.__dict__["__deepcopy__"] = _refuse_deepcopy(module)
        slots[slot] = self

        def release():
            slots.pop(slot, None)
            guard = module.__dict__.get("__deepcopy__")
            if not slots and getattr(guard, "vtoken_guard", False):
                del module.__dict__["__deepcopy__"]

        self._undo.append(release)

    def forward_pre_hook(self, module: Any, fn: Callable, **kwargs: Any) -> Any:
        """``module.register_forward_pre_hook(fn, **kwargs)``, undone by ``remove()`` and seen by compiled code."""
        return self._track_hook(module, module.register_forward_pre_hook(fn, **kwargs))

    def forward_hook(self, module: Any, fn: Callable, **kwargs: Any) -> Any:
        """``module.register_forward_hook(fn, **kwargs)``, undone by ``remove()`` and seen by compiled code."""
        return self._track_hook(module, module.register_forward_hook(fn, **kwargs))

    def _track_hook(self, module: Any, removable: Any) -> Any:
        _mark_hooked(module)

        def undo():
            removable.remove()
            _unmark_hooked(module)

        self._undo.append(undo)
        return removable

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Shadow ``obj.name`` on this instance only; the previous instance state comes back on remove()."""
        previous = obj.__dict__.get(name, _MISSING)
        obj.__dict__[name] = value  # bypasses nn.Module.__setattr__, so a function never becomes a submodule

        def restore():
            if previous is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = previous

        self._undo.append(restore)

    def on_remove(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def on_reset(self, fn: Callable[[], None]) -> None:
        """Register how to clear state the method keeps between calls (see ``reset``)."""
        self._resets.append(fn)

    def on_update(self, fn: Callable[[Any], None]) -> None:
        """Register how the installed method takes a new config (see ``update``); ``fn`` raises to refuse it."""
        self._updater = fn

    # -- using it ----------------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._active

    def reset(self) -> None:
        """Forget state kept between calls (e.g. caches carried across denoising steps); the patch stays installed."""
        for fn in self._resets:
            fn()

    def update(self, **changes: Any) -> None:
        """Change config fields between calls without re-patching, e.g. ``handle.update(num_tokens=64)``.

        The new config is validated like ``vtoken.patch``'s and checked against the model before anything changes;
        methods whose adapter cannot take a new config in place refuse (remove the patch and patch again).
        """
        if not self._active:
            raise RuntimeError(f"this {self.method!r} handle was removed; patch the model again instead")
        valid = [f.name for f in dataclasses.fields(self.config) if f.init]
        unknown = sorted(set(changes) - set(valid))
        if unknown:
            raise ValueError(f"unknown argument(s) {', '.join(map(repr, unknown))} for method {self.method!r}; "
                             f"valid arguments: {', '.join(valid)}")
        if self._updater is None:
            raise ValueError(f"method {self.method!r} cannot change its config while installed; call .remove() and "
                             f"vtoken.patch(model, {self.method!r}, ...) again")
        config = dataclasses.replace(self.config, **changes)
        self._updater(config)
        self.config = config

    def remove(self) -> None:
        """Restore the model exactly as it was before ``patch``; safe to call twice."""
        errors = []
        while self._undo:
            fn = self._undo.pop()
            try:
                fn()
            except Exception as exc:  # keep undoing: a half-restored model is worse than a reported error
                errors.append(exc)
        self._resets.clear()
        self._updater = None
        self._active = False
        if errors:
            raise RuntimeError(f"vtoken: {len(errors)} step(s) failed while removing {self.method!r}: {errors[0]!r}")

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return f"<vtoken.Handle {self.method!r} on {type(self.model).__name__} ({self.host}), {state}>"

"""Methods as pure tensor code plus a validated config dataclass each (registered with ``register_method``).

``vtoken.methods`` is both this package and the documented registry call ``vtoken.methods()``: importing a
subpackage rebinds the parent's attribute, so the package itself is made callable instead of fighting that.
"""

import importlib
import pkgutil
import sys
import types

# Every module here registers its methods on import (``register_method``), so a new method is one new file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
del _module


class _RegistryModule(types.ModuleType):
    def __call__(self):
        """Registry: method name -> MethodInfo (config class, supported hosts, one-line summary)."""
        from vtoken.registry import method_registry

        return method_registry()


sys.modules[__name__].__class__ = _RegistryModule

"""Methods as pure tensor code plus a validated config dataclass each (registered with ``register_method``).

``vtoken.methods`` is both this package and the documented registry call ``vtoken.methods()``: importing a
subpackage rebinds the parent's attribute, so the package itself is made callable instead of fighting that.
"""

import sys
import types

from vtoken.methods import (  # noqa: F401  (registration side effects)
    baselines,
    clustering,
    corematching,
    divprune,
    svg2,
    todre,
    tokenflex,
    transprune,
)


class _RegistryModule(types.ModuleType):
    def __call__(self):
        """Registry: method name -> MethodInfo (config class, supported hosts, one-line summary)."""
        from vtoken.registry import method_registry

        return method_registry()


sys.modules[__name__].__class__ = _RegistryModule

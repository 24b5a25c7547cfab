"""vtoken: make vision models spend fewer tokens, one ``vtoken.patch`` call at a time.

>>> handle = vtoken.patch(model, "todre", keep=64)   # int = tokens kept, float = fraction kept
>>> model.generate(**inputs)                          # unchanged user code
>>> handle.remove()                                   # the model is exactly the original again
"""

from vtoken import methods  # the package is callable: vtoken.methods() -> registry
from vtoken.api import hosts, make_config, patch
from vtoken.budget import check_budget, resolve_budget
from vtoken.handle import Handle

__version__ = "0.1.0"
__all__ = ["Handle", "check_budget", "hosts", "make_config", "methods", "patch", "resolve_budget", "__version__"]

from vtoken.adapters._compat import warn_untested_versions  # noqa: E402

warn_untested_versions()

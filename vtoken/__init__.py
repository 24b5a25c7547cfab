"""vtoken: make vision models spend fewer tokens, one ``vtoken.patch`` call at a time.

>>> handle = vtoken.patch(model, "todre", keep=64)   # int = tokens kept, float = fraction kept
>>> model.generate(**inputs)                          # unchanged user code
>>> handle.remove()                                   # the model is exactly the original again
"""

import importlib.machinery as _machinery
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path


def _attach_checkout_subpackages() -> None:
    """Make ``vtoken.adapters``, ``vtoken.kernels`` and ``vtoken.evals`` importable from a source checkout.

    A wheel installs them inside this package. In a checkout they are top-level folders without ``__init__.py``, so
    that from the checkout's root (``python -m pytest``, ``python -m vtoken.cli``, a notebook) they can never shadow
    an installed package of the same name: transformers imports Hugging Face's ``kernels``, and a namespace folder
    loses to any installed package (docs/design.md, "Top-level names"). setuptools' editable finder does not find a
    namespace folder mapped under a regular package, so this does, for the checkout this file belongs to only.
    """
    here = _Path(__file__).resolve().parent
    root = here.parent
    if not (root / "pyproject.toml").is_file():
        return
    for name in ("adapters", "evals", "kernels"):
        fullname = f"{__name__}.{name}"
        if fullname in _sys.modules or (here / name).is_dir() or not (root / name).is_dir():
            continue
        spec = _machinery.PathFinder.find_spec(fullname, [str(root)])  # a namespace spec: the folder has no __init__
        _sys.modules[fullname] = globals()[name] = _util.module_from_spec(spec)


_attach_checkout_subpackages()

from vtoken import methods  # noqa: E402  (callable: vtoken.methods() -> registry)
from vtoken.api import hosts, make_config, patch  # noqa: E402
from vtoken.budget import check_budget, resolve_budget  # noqa: E402
from vtoken.handle import Handle  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Handle", "check_budget", "hosts", "make_config", "methods", "patch", "resolve_budget", "__version__"]

from vtoken.adapters._compat import warn_untested_versions  # noqa: E402

warn_untested_versions()

"""vtoken's packages, found on disk (everything else is in pyproject.toml).

The core lives in ``vtoken/``; ``adapters/``, ``kernels/`` and ``evals/`` install as ``vtoken.adapters``,
``vtoken.kernels`` and ``vtoken.evals``. Every package below those four folders is found here, so a new sub-package
cannot be left out of the wheel. Folders of data (``assets``) are listed too, as setuptools asks of folders that
hold package data; pyproject.toml's ``package-data`` says which of their files ship.
"""

from setuptools import find_namespace_packages, setup

ROOTS = {"vtoken": "vtoken", "vtoken.adapters": "adapters", "vtoken.kernels": "kernels", "vtoken.evals": "evals"}
NOT_PACKAGES = ["*__pycache__*"]


def packages() -> list[str]:
    found = []
    for name, folder in ROOTS.items():
        found += [name] + [f"{name}.{sub}" for sub in find_namespace_packages(folder, exclude=NOT_PACKAGES)]
    return found


setup(packages=packages(), package_dir=ROOTS)

"""The checkout's top-level folders never shadow an installed package when Python runs from the checkout's root.

``python -m pytest``, ``python -m vtoken.cli``, ``python -c`` and a notebook started there put the root first on
``sys.path``. transformers 5.25 imports Hugging Face's ``kernels`` package whenever it is installed; a ``kernels``
folder of ours found first broke every import of transformers. Each case here fakes an installed distribution of one
of our folder names (a package and its ``dist-info``, placed after the root on ``sys.path``, as site-packages is)
and runs Python from the root.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_VERSION = "0.19.1"  # inside the window transformers 5.25 accepts for ``kernels``

# Everything transformers' hub_kernels imports from ``kernels`` at import time, answered by one permissive object: a
# decorator factory returns its argument unchanged, attributes and calls return the object itself.
FAKE_PACKAGE = textwrap.dedent('''
    FAKE = True

    class _Anything:
        def __call__(self, *args, **kwargs):
            return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else self

        def __getattr__(self, name):
            return self

    def __getattr__(name):
        return _Anything()
''')


def fake_distribution(site: Path, name: str) -> Path:
    package = site / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_PACKAGE)
    info = site / f"{name}-{FAKE_VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {FAKE_VERSION}\n")
    (info / "top_level.txt").write_text(name + "\n")
    return package


def run_from_root(code: str, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONSAFEPATH", None)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["kernels", "adapters", "evals", "tests"])
def test_installed_package_wins_over_our_folder(tmp_path, name):
    assert (ROOT / name).is_dir()
    package = fake_distribution(tmp_path, name)
    result = run_from_root(textwrap.dedent(f'''
        import sys
        assert sys.path[0] in ("", {str(ROOT)!r}), sys.path[:2]   # the root is first, as with python -m
        import {name}
        print({name}.__file__)
    '''), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(package / "__init__.py")


def test_transformers_and_vtoken_kernels_import_from_root_with_kernels_installed(tmp_path):
    fake_distribution(tmp_path, "kernels")
    result = run_from_root(textwrap.dedent(f'''
        import kernels
        assert getattr(kernels, "FAKE", False), kernels.__file__   # the installed one, not ./kernels
        import transformers
        from transformers import LlavaForConditionalGeneration  # its activations import transformers' hub_kernels
        import vtoken
        from vtoken.kernels.attention import attention_received
        from vtoken.kernels.dispatch import BACKENDS
        import vtoken.adapters.llava, vtoken.evals.bench.flops
        assert vtoken.kernels.attention.__file__.startswith({str(ROOT / "kernels")!r})
        assert "llava" in vtoken.hosts()
        print("ok")
    '''), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


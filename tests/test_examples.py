"""Every script in examples/ runs as a user runs it (a fresh process from the repository root, offline) and prints what
it promises; a script without a check here fails, so no example can rot unnoticed."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def numbers(pattern: str, text: str) -> list[float]:
    """The groups of the first match of ``pattern`` as floats; fails with the output when nothing matches."""
    found = re.search(pattern, text, re.MULTILINE)
    assert found, f"no line matches {pattern!r} in:\n{text}"
    return [float(g) for g in found.groups()]


def table_row(name: str, text: str) -> list[str]:
    found = re.search(rf"^{re.escape(name)}\s+(.*)$", text, re.MULTILINE)
    assert found, f"no table row {name!r} in:\n{text}"
    return found.group(1).split()


def check_llava_generate(out: str) -> None:
    kept, total = numbers(r"^ToDRE kept (\d+) of (\d+) visual tokens per image", out)
    assert (kept, total) == (20, 196)
    llm, *per_layer, dense = numbers(r"^sample 0 enters the LLM with (\d+) visual tokens; .* layer is "
                                     r"\[(\d+), (\d+), (\d+), (\d+)\] \(dense: (\d+)\)", out)
    assert llm == 20 and per_layer == [dense - 176] * 4  # 196 - 20 visual tokens fewer in every decoder layer
    right, n = numbers(r"^todre at 10% of the visual tokens: (\d+)/(\d+) right", out)
    assert n == 8 and right >= 7
    assert len(re.findall(r"^(what|how|is) .*\?\s+\w+\s+\w+\s+\w+$", out, re.MULTILINE)) == 8  # the answer table
    assert "after remove(), the answers equal the dense ones: True" in out


def check_compare_methods(out: str) -> None:
    registry, _, table = out.partition("ShapesVQA, 40 test questions in one batch, keep = 0.1 of 196 visual tokens")
    for method in ("todre", "random", "pool", "attn_topk", "transprune", "corematching", "token_clustering", "svg2"):
        assert re.search(rf"^{method}\s+hosts: ", registry, re.MULTILINE), method
    assert "todre fields: {'keep': 0.25" in registry
    accuracy = {}
    for name in ("dense", "todre", "random", "pool", "attn_topk", "transprune", "corematching", "token_clustering"):
        acc, into_llm, *rest = table_row(name, table)
        accuracy[name] = float(acc.rstrip("%"))
        layers = [int(x) for x in re.findall(r"\d+", " ".join(rest[:-3]))]
        assert len(layers) == 4, (name, rest)
        if name == "dense":
            assert float(into_llm) == 196 and layers == [196] * 4
        elif name in ("attn_topk", "transprune", "corematching"):  # in-LLM pruning: all 196 enter, fewer later
            assert float(into_llm) == 196 and layers[0] == 196 and layers[-1] == 20
        elif name == "token_clustering":
            assert float(into_llm) == 16 and layers == [16] * 4  # a 4x4 cluster grid
        else:
            assert float(into_llm) == 20 and layers == [20] * 4
    assert accuracy["dense"] >= 90 and accuracy["todre"] >= accuracy["random"]


def check_vit_token_clustering(out: str) -> None:
    assert "tokens entering each of the 12 blocks: [197, 197, 197, 197, 50, 50, 50, 50, 50, 50, 50, 50]" in out
    assert "output shape: dense (4, 197, 192), clustered (4, 197, 192)" in out
    cls, patches = numbers(r"^cosine similarity to dense: \[CLS\] ([\d.]+), patch tokens ([\d.]+)", out)
    assert 0.9 < cls <= 1.0 and 0.9 < patches < 1.0
    assert all(v > 0 for v in numbers(r"^images/s: dense ([\d.]+), clustered ([\d.]+)", out))
    assert "reconstruct=False: output shape (4, 50, 192)" in out
    assert "after the patch is removed the ViT is dense again: True" in out


def check_llava_tower_clustering(out: str) -> None:
    (dense,) = numbers(r"^dense:\s+accuracy\s+([\d.]+)%", out)
    assert dense >= 90
    for label in ("A. reconstructed", "B. clusters to the LLM", "C. clusters \\+ ToDRE"):
        (acc,) = numbers(rf"^{label}: accuracy\s+([\d.]+)%", out)
        assert 50 <= acc <= 100, label
    assert "tower blocks 3-4 of 4 ran on 50 tokens instead of 197; the LLM still sees 196 visual tokens" in out
    assert "the LLM sees 49 visual tokens per image (a (7, 7) grid)" in out
    assert "ToDRE kept 25 of the 49 cluster tokens" in out
    (restored,) = numbers(r"^all patches removed: accuracy\s+([\d.]+)%", out)
    assert restored == dense


def check_svg2_wan_denoising(out: str) -> None:
    rows = re.findall(r"^\s+(\d+)  (.+?)\s{2,}(\S+)\s+(\S+)\s+([\d.]+)% \(relative L2\)$", out, re.MULTILINE)
    assert [int(r[0]) for r in rows] == list(range(6)), out
    for step, density, kmeans, attention, drift in rows:
        cells = density.split()
        if int(step) < 2:  # dense_steps=2: the original attention everywhere, bit-exact
            assert cells == ["dense"] * 3 and (kmeans, attention) == ("-", "-") and float(drift) == 0
        else:  # dense_layers=1: layer 0 stays dense, layers 1 and 2 run sparse
            assert cells[0] == "dense" and all(0 < float(c) < 1 for c in cells[1:]), cells
            assert float(kmeans) > 0 and float(attention) > 0 and float(drift) > 0
    sparse, overall = numbers(r"^mean density: ([\d.]+) over the 8 sparse calls, ([\d.]+) over all 18 calls", out)
    assert 0 < sparse < overall < 1


def check_lmms_eval_shapes(out: str) -> None:
    assert re.search(r"^task written to .*shapes_vqa \(removed at the end\)$", out, re.MULTILINE)
    rows = {name: table_row(name, out) for name in ("dense", "todre keep=0.1", "random keep=0.1")}
    assert [float(r[-1]) for r in rows.values()] == [196.0, 20.0, 20.0]  # visual tokens into the LLM
    metric = {name: float(r[-2]) for name, r in rows.items()}
    assert all(0 <= m <= 1 for m in metric.values()) and metric["dense"] >= 0.9


CHECKS = {
    "01_llava_generate.py": check_llava_generate,
    "02_compare_methods.py": check_compare_methods,
    "03_vit_token_clustering.py": check_vit_token_clustering,
    "04_llava_tower_clustering.py": check_llava_tower_clustering,
    "05_svg2_wan_denoising.py": check_svg2_wan_denoising,
    "06_lmms_eval_shapes.py": check_lmms_eval_shapes,
}
NEEDS = {"05_svg2_wan_denoising.py": "diffusers", "06_lmms_eval_shapes.py": "lmms_eval"}


def test_every_example_has_a_check():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CHECKS)


def untracked_files() -> set[str] | None:
    """Files in the repository that git neither tracks nor ignores (None outside a git checkout). An example that
    writes into the repository adds one; edits made to tracked files while the tests run do not count."""
    if shutil.which("git") is None:
        return None
    done = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True,
                          text=True)
    return set(done.stdout.splitlines()) if done.returncode == 0 else None


def run_example(name: str, hf_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # tiny models on a shared CPU: threads only contend
    env.pop("TRITON_INTERPRET", None)  # as a user runs them (CPU tensors take the PyTorch paths anyway)
    return subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def example_runs(request, tmp_path_factory):
    """Submits every selected example up front and runs two at a time (each single-threaded), so the file takes
    about half the wall time of running them one by one; each test then waits for its own."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    runnable = [n for n in selected if n not in NEEDS or importlib.util.find_spec(NEEDS[n]) is not None]
    before = untracked_files()
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        yield before, {n: pool.submit(run_example, n, tmp_path_factory.mktemp("hf")) for n in runnable}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_example(name, example_runs):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    before, runs = example_runs
    run = runs[name].result()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    CHECKS[name](run.stdout)
    after = untracked_files()
    if before is not None and after is not None:
        assert after <= before, f"an example wrote into the repository: {sorted(after - before)}"

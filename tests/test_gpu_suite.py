"""The GPU suite's dry run (`evals/gpu_suite.sh --device cpu --smoke`): every part runs on tiny shapes and writes its
report, so the first GPU run measures instead of debugging. Also its refusals and its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vtoken.evals.bench import gpu_suite

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "evals" / "gpu_suite.sh"


def suite(*args, timeout=900):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)  # the suite's own parts decide (the GPU tests set it on a CPU)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=REPO)


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_the_report(tmp_path):
    out = tmp_path / "gpu"
    proc = suite("--device", "cpu", "--smoke", "--no-install", "--out", str(out), timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    parts = [line.split("\t") for line in (out / "parts.tsv").read_text().splitlines()]
    assert [p[0] for p in parts] == [
        "environment", "pytest_gpu", "bench_llava15_b1", "bench_llava15_b1_static", "bench_llava15_b4",
        "bench_llava_next",
        "bench_llava15_sdpa_math", "bench_llava_next_sdpa_math", "bench_qwen25", "bench_vit", "bench_dit",
        "bench_kernels", "bench_compiled_llava15_b1", "bench_compiled_in_llm_llava15_b1"]
    assert all(p[1] == "ok" for p in parts), parts
    readme = (out / "README.md").read_text()
    assert "CPU (dry run: no figure here is a GPU measurement)" in readme
    assert json.loads((out / "pytest_gpu.json").read_text())["failures"] == 0
    b1 = json.loads((out / "bench_llava15_b1.json").read_text())
    assert [r["method"] for r in b1["results"]] == ["dense", "todre", "random", "pool", "attn_topk", "divprune",
                                                    "transprune", "corematching"]
    boundary = [r for r in b1["results"] if r["method"] in ("todre", "random", "pool", "divprune")]
    assert len(boundary) == 4 and all(r["visual_tokens_llm"] == 16 for r in boundary)  # --keep 16 of 64
    for md in ("bench_llava15_b1.md", "bench_llava_next.md", "bench_vit/bench_vit.md", "bench_dit/bench_dit.md",
               "bench_kernels/bench_kernels.md"):
        assert "Device: CPU (dry run" in (out / md).read_text() and "| ---" in (out / md).read_text()
    assert "todre keep=0.25" in (out / "bench_llava_next.md").read_text()
    compiled = json.loads((out / "bench_compiled_llava15_b1.json").read_text())
    assert "vision tower and decoder compiled (eager)" in compiled["title"]
    assert [r["visual_tokens_llm"] for r in compiled["results"][1:]] == [16, 16, 16]
    in_llm = json.loads((out / "bench_compiled_in_llm_llava15_b1.json").read_text())["results"]
    assert [r["method"] for r in in_llm] == ["dense", "attn_topk", "todre"]
    assert in_llm[1]["visual_tokens_last_layer"] == 16 and in_llm[2]["visual_tokens_llm"] == 16


def test_parts_runs_the_chosen_parts_and_keeps_the_other_rows(tmp_path):
    out = tmp_path / "gpu"
    out.mkdir()
    (out / "parts.tsv").write_text("environment\tok\t5\t30\nbench_llava15_b1\tok\t50\t75\nbench_dit\tok\t20\t35\n")
    proc = suite("--device", "cpu", "--smoke", "--no-install", "--out", str(out), "--parts", "bench_dit", timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [line.split("\t")[:2] for line in (out / "parts.tsv").read_text().splitlines()]
    assert rows == [["bench_llava15_b1", "ok"], ["environment", "ok"], ["bench_dit", "ok"]]
    assert "=== bench_kernels" not in proc.stdout and (out / "bench_dit" / "bench_dit.json").exists()


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    proc = suite("--device", "tpu", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--device must be cuda or cpu, got 'tpu'" in proc.stderr
    proc = suite("--budget", "7m", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--budget must be whole seconds" in proc.stderr
    proc = suite("--fast")
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_cuda_suite_stops_before_measuring(tmp_path):
    proc = suite("--device", "cuda", "--no-install", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 1
    assert "error: --device cuda, but torch sees no CUDA device" in proc.stdout  # the part's log, on stdout
    assert "nothing was measured" in proc.stderr
    status = (tmp_path / "parts.tsv").read_text().splitlines()
    assert len(status) == 1 and status[0].startswith("environment\tfailed (exit 1; see logs/environment.log)")
    assert "--device cuda, but torch sees no CUDA device" in (tmp_path / "environment.json").read_text()


def test_a_stopped_part_is_reported_and_the_rest_go_on(tmp_path):
    (tmp_path / "parts.tsv").write_text("environment\tok\t3\t30\nbench_dit\tstopped: overran its 45s share\t55\t45\n")
    readme = gpu_suite.write_report(tmp_path)
    assert "| bench_dit | stopped: overran its 45s share | 55 | 45 |" in readme
    assert "environment check did not run" in readme


def test_wheel_requirements_are_checked_against_the_environment(tmp_path):
    dist = tmp_path / "demo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: demo\nVersion: 1.0\nRequires-Dist: torch>=99\n"
                                   "Requires-Dist: no-such-package-here\nRequires-Dist: pytest\n"
                                   "Requires-Dist: ruff; extra == \"lint\"\n")
    problems = gpu_suite.unmet_requirements(tmp_path)
    assert len(problems) == 2
    assert "demo needs torch>=99; torch" in problems[0]
    assert "no-such-package-here, which is not installed" in problems[1]

"""``vtoken bench-kernels`` on a CPU: references only at the real sizes, or a --smoke run that checks the Triton
kernels in the interpreter, and says that Triton timings need a GPU."""

from __future__ import annotations

import json

import pytest

from vtoken.cli import main


def test_smoke_runs_every_kernel_through_the_interpreter(tmp_path, capsys):
    assert main(["bench-kernels", "--smoke", "--reps", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Triton timings need a CUDA device" in out and "not speeds" in out
    report = json.loads((tmp_path / "bench_kernels.json").read_text())
    assert report["interpreter"] is True
    kernels = [r["kernel"] for r in report["results"]]
    assert kernels == ["compaction", "attention scoring", "attention scoring", "greedy selection", "dpp greedy map"]
    for r in report["results"]:
        assert r["triton_ms"] > 0 and r["speedup"] is None  # interpreter times are no speed
        assert r["agree"] == "exact" or r["agree"].startswith("max abs diff")
    assert "| compaction |" in (tmp_path / "bench_kernels.md").read_text()


def test_cpu_without_smoke_times_the_references_only(capsys):
    assert main(["bench-kernels", "--sizes", "llava-1.5", "--reps", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "only the PyTorch references are timed" in out
    assert out.count("needs a GPU") == 5 and "| llava-1.5 | 1 |" in out


def test_unknown_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench-kernels", "--sizes", "llava-2"])
    assert exit_info.value.code == 2
    assert "--sizes llava-2: unknown; choose from" in capsys.readouterr().err

"""``vtoken bench-dit`` runs end to end on the tiny shape and reports consistent numbers."""

import json

import torch
from svg2_utils import one_thread  # noqa: F401  (autouse fixture)

from vtoken.cli import main
from vtoken.evals.bench.dit import SHAPES, structured_qkv


def test_bench_dit_writes_json_and_png(tmp_path, capsys):
    assert main(["bench-dit", "--shape", "tiny", "--reps", "1", "--top-p", "0.6,1.0", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_dit.json").read_text())
    assert (tmp_path / "bench_dit.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "no GPU" in printed and "machine:" in printed and "dense SDPA" in printed
    assert report["shape"]["tokens"] == 288 and report["machine"]["cpu_count"] >= 1
    sparse, full = report["results"]
    assert full["top_p"] == 1.0 and full["density"] == 1.0 and full["recall"] == 1.0
    assert full["relative_error"] < 1e-5
    assert 0 < sparse["density"] < 1 and sparse["recall"] < 1 and sparse["relative_error"] > 0
    assert report["kmeans_warm_ms"] > 0 and report["dense_ms"] > 0
    assert report["flashinfer"].startswith("not timed") and "flashinfer: not timed" in printed  # CPU: no FlashInfer
    assert "flashinfer" not in sparse


def test_structured_inputs_concentrate_attention_on_each_tokens_object():
    q, k, _ = structured_qkv(SHAPES["cpu"], "cpu", objects=32)
    probs = torch.softmax(q[:1, :256] @ k[:1].transpose(1, 2) / 8, -1)
    top = probs.sort(-1, descending=True).values.cumsum(-1)
    keys_for_90 = (top < 0.9).sum(-1).float().mean() / k.shape[1]
    assert keys_for_90 < 0.2  # attention is sparse ...
    assert probs.max(-1).values.mean() < 0.5  # ... but not one-hot

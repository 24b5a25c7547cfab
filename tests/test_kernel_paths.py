"""The in-LLM methods keep the same tokens whether DecoderPruner runs its kernels (compaction, attention-row scoring)
in PyTorch or in Triton (the interpreter on CPU), on left-padded batches whose samples keep different counts."""

from __future__ import annotations

import pytest
import torch
from test_llava_invariants import Host

import vtoken

METHODS = {
    "attn_topk": dict(keep=0.3),  # scores the last row, prunes after layer 2: ragged keeps, filler slots
    "todre": dict(keep=0.25, tau=1.0),  # stage 2 scores text and visual rows and removes every visual token
    "todre_kept": dict(keep=0.25, tau=0.0),  # stage 2 scores but keeps: its ratios must agree too
}


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def host(request):
    return Host(request.param)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_torch_and_triton_backends_keep_the_same_tokens(host, name):
    seen = {}
    for backend in ("torch", "triton"):
        method = name.removesuffix("_kept")
        with vtoken.patch(host.model, method, backend=backend, **METHODS[name]) as handle, torch.no_grad():
            logits = host.model(**host.batch()).logits
            stats = handle.stats
            seen[backend] = (logits, stats.tokens_per_layer, stats.visual_alive, stats.records)
    (logits_t, counts_t, alive_t, records_t), (logits_x, counts_x, alive_x, records_x) = seen["torch"], seen["triton"]
    assert counts_t == counts_x and alive_t == alive_x
    for layer, record in records_t.items():
        for key, values in record.items():
            if key == "removed":
                assert records_x[layer][key] == values
            else:
                torch.testing.assert_close(torch.tensor(records_x[layer][key]), torch.tensor(values))
    torch.testing.assert_close(logits_x, logits_t, atol=1e-5, rtol=1e-5)


def test_attn_topk_batch_has_fillers(host):
    """The batch above really exercises the ragged path: samples keep different numbers of tokens."""
    with vtoken.patch(host.model, "attn_topk", backend="triton", **METHODS["attn_topk"]) as handle, torch.no_grad():
        host.model(**host.batch())
    counts = handle.stats.tokens_per_layer[-1]
    assert len(set(counts)) > 1, counts

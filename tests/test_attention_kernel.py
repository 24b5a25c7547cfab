"""Attention-row scoring: the Triton kernels (interpreter on CPU) equal the PyTorch reference, and the reference
equals the definition written out with every row's probabilities."""

from __future__ import annotations

import pytest
import torch
from gpu_compile import SMALLEST_SHARED_MEMORY, compile_for_gpus

from vtoken.kernels.attention import attention_received, naive

triton = pytest.importorskip("triton")


def inputs(B, Hq, Hk, R, K, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, R, D, generator=g).to(dtype)
    k = torch.randn(B, Hk, K, D, generator=g).to(dtype)
    weights = torch.rand(B, R, generator=g)
    masks = dict(
        causal_rows=torch.randint(0, K, (B, R), generator=g),
        key_valid=torch.rand(B, K, generator=g) > 0.2,
        allowed=torch.rand(B, R, K, generator=g) > 0.3,
    )
    return q, k, weights, masks


def definition(q, k, weights, scale, **masks):
    """Every row's full probabilities, then the weighted sum over rows of the head mean."""
    B, Hq, R, _ = q.shape
    keys = k.float().repeat_interleave(Hq // k.shape[1], dim=1)
    allowed = naive.allowed_keys(B, R, k.shape[2], q.device, **masks)
    scores = (q.float() @ keys.transpose(-1, -2) * scale).masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # (B, H, R, K)
    return torch.einsum("br,bhrk->bk", weights, probs) / Hq


MASKS = [(), ("causal_rows",), ("causal_rows", "key_valid"), ("allowed",), ("causal_rows", "key_valid", "allowed")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hk,R,K,D", [
    (2, 4, 2, 5, 37, 24),  # GQA, non-power-of-two rows, keys and head dim
    (1, 4, 4, 1, 130, 32),  # one row (attn_topk), keys over several tiles
    (3, 6, 2, 40, 71, 16),  # rows over several tiles
    (2, 2, 1, 3, 1, 16),  # one key
])
def test_kernel_equals_reference(dtype, B, Hq, Hk, R, K, D):
    q, k, weights, masks = inputs(B, Hq, Hk, R, K, D, dtype)
    for names in MASKS:
        chosen = {name: masks[name] for name in names}
        ref = attention_received(q, k, weights, 0.3, **chosen, backend="torch")
        got = attention_received(q, k, weights, 0.3, **chosen, backend="triton")
        assert got.dtype == torch.float32 and got.shape == (B, K)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_reference_equals_the_definition_and_rows_without_keys_add_nothing():
    q, k, weights, masks = inputs(2, 4, 2, 70, 70, 16, torch.float32, seed=1)
    rows = torch.arange(70).expand(2, 70)  # k = n: every row of a causal prompt
    masks["key_valid"][:, :10] = False  # rows 0..9 see no key at all
    chosen = dict(causal_rows=rows, key_valid=masks["key_valid"])
    want = definition(q, k, weights, 0.25, **chosen)
    for chunk in (1, 16, 128):
        torch.testing.assert_close(naive.attention_received(q, k, weights, 0.25, chunk=chunk, **chosen), want)
    torch.testing.assert_close(attention_received(q, k, weights, 0.25, **chosen, backend="triton"), want,
                               rtol=1e-5, atol=1e-6)
    alone = weights.clone()
    alone[:, 10:] = 0  # only the rows that see nothing
    assert torch.equal(attention_received(q, k, alone, 0.25, **chosen, backend="triton"), torch.zeros(2, 70))
    total = attention_received(q, k, weights, 0.25, **chosen, backend="triton").sum(1)
    torch.testing.assert_close(total, weights[:, 10:].sum(1))  # every other row gives away exactly its weight


def test_bad_shapes_are_refused():
    q, k, weights, masks = inputs(2, 4, 2, 5, 9, 16, torch.float32)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key heads \(2\)"):
        attention_received(q[:, :3], k, weights, 1.0)
    with pytest.raises(ValueError, match=r"weights must have shape \(2, 5\)"):
        attention_received(q, k, weights[:, :4], 1.0)
    with pytest.raises(ValueError, match=r"key_valid must have shape \(2, 9\)"):
        attention_received(q, k, weights, 1.0, key_valid=masks["key_valid"][:, :8])
    with pytest.raises(ValueError, match=r"q must be \(B, Hq, R, D\)"):
        attention_received(q[0], k, weights, 1.0)


@pytest.mark.slow
def test_kernels_compile_for_gpus():
    """Every configuration ``block_sizes`` picks on a GPU, for a 128-wide head, in each dtype."""
    shared = compile_for_gpus(r'''
import torch
from vtoken.kernels.attention.received import _received_kernel, _row_stats_kernel, block_sizes
strides = {n: "i32" for n in ["sq_b", "sq_h", "sq_r", "sk_b", "sk_h", "sk_k"]}
dims = {n: "i32" for n in ["R", "K", "D", "Hq", "G"]}
masks = {"rows_ptr": "*i32", "valid_ptr": "*i8", "dense_ptr": "*i8"}
for dtype, name, arch in [(torch.float16, "*fp16", 80), (torch.bfloat16, "*bf16", 90), (torch.float32, "*fp32", 80)]:
    for rows in (1, 64):
        block_r, block_n, block_d = block_sizes(rows, 641, 128, dtype, cuda=True)
        consts = {"HAS_ROWS": True, "HAS_VALID": True, "HAS_DENSE": True, "UPCAST": dtype == torch.float32,
                  "BLOCK_R": block_r, "BLOCK_N": block_n, "BLOCK_D": block_d}
        types = {"q_ptr": name, "k_ptr": name, **masks, "max_ptr": "*fp32", "inv_ptr": "*fp32", **dims,
                 "qk_scale": "fp32", **strides}
        shared[f"stats {name} R{block_r} sm_{arch}"] = compile_kernel(
            _row_stats_kernel, types, consts, arch).metadata.shared
        types.update({"w_ptr": "*fp32", "part_ptr": "*fp32", "B": "i32", "head_share": "fp32"})
        shared[f"received {name} R{block_r} sm_{arch}"] = compile_kernel(
            _received_kernel, types, consts, arch).metadata.shared
''')
    too_big = {name: size for name, size in shared.items() if size > SMALLEST_SHARED_MEMORY}
    assert len(shared) == 12 and not too_big, too_big

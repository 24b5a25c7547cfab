"""Greedy diversity selection: the Triton kernel (interpreter on CPU) equals its PyTorch reference exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_compile import SMALLEST_SHARED_MEMORY, compile_for_gpus
from tiny_models import prompt, tiny_llava

import vtoken
from vtoken.kernels.diversity import cosine_similarities, greedy_select, naive

triton = pytest.importorskip("triton")


def normalised(n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)


@pytest.mark.parametrize("n,k", [(5, 5), (37, 9), (100, 30), (130, 1)])
@pytest.mark.parametrize("maxmin", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_equals_reference_on_gram(n, k, maxmin, dtype):
    from vtoken.kernels.diversity.greedy import greedy_from_gram_triton

    x = torch.stack([normalised(n, 24, seed) for seed in range(3)])
    gram = (x @ x.transpose(1, 2)).to(dtype)  # batched over images, non-power-of-two n (masked tail)
    pivot = torch.tensor([0, n // 2, n - 1])
    expected = naive.greedy_from_gram(gram, k, pivot, maxmin)
    assert torch.equal(greedy_from_gram_triton(gram, k, pivot, maxmin), expected)
    assert all(len(set(row.tolist())) == min(k, n) for row in expected)


@pytest.mark.parametrize("rule", ["maxsum", "maxmin"])
def test_matvec_loop_equals_gram_definition(rule):
    x = normalised(90, 16, seed=3, dtype=torch.float64)  # float64: no near-tie can flip between the two orders
    gram = (x @ x.T).unsqueeze(0)
    reference = naive.greedy_from_gram(gram, 25, torch.tensor([7]), rule == "maxmin")
    assert torch.equal(greedy_select(x[None], 25, torch.tensor([7]), rule, backend="torch"), reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cosine_similarities_are_fp32_cosines_of_rows_of_any_scale(dtype):
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(2, 7, 48, generator=g) * torch.rand(2, 7, 1, generator=g) * 30).to(dtype)
    b = (torch.randn(2, 11, 48, generator=g) * 5).to(dtype)
    a64, b64 = F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1)
    for left, right, expected in ((a, b, a64 @ b64.mT), (b, b, b64 @ b64.mT)):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # ignored: an autocast would round them to bf16
            got = cosine_similarities(left, right)
        assert got.dtype == torch.float32
        # fp32 accuracy: the half-precision products are exact, only the fp32 sums round
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_selection_reads_cosines_whatever_the_rows_scale(backend):
    x = torch.stack([normalised(60, 16, seed=s, dtype=torch.float64) for s in (4, 5)])
    scaled = (x * torch.linspace(0.1, 40.0, 60, dtype=torch.float64)[:, None]).float()
    pivots = torch.tensor([3, 50])
    expected = naive.greedy_from_features(x, 12, pivots, maxmin=True)
    assert torch.equal(greedy_select(scaled, 12, pivots, "maxmin", backend=backend), expected)


def test_dispatch_picks_the_loop_on_cpu_and_validates():
    x = torch.stack([normalised(20, 8, seed=s) for s in (1, 2)])
    pivots = torch.tensor([2, 5])
    expected = naive.greedy_from_features(x, 6, pivots, maxmin=False)
    assert torch.equal(greedy_select(x, 6, pivots, "maxsum"), expected)
    assert torch.equal(greedy_select(x, 6, pivots, "maxsum", backend="triton"), expected)
    with pytest.raises(ValueError, match="rule='kcenter' is not allowed"):
        greedy_select(x, 6, pivots, "kcenter")
    with pytest.raises(ValueError, match="backend='cuda' is not allowed"):
        greedy_select(x, 6, pivots, "maxsum", backend="cuda")


def test_todre_with_the_triton_backend_equals_the_torch_backend():
    model = tiny_llava()
    ids, px = prompt(64).unsqueeze(0), torch.randn(1, 3, 112, 112)
    kept = {}
    for backend in ("torch", "triton"):
        with vtoken.patch(model, "todre", keep=12, stage2=False, backend=backend) as h, torch.no_grad():
            model(input_ids=ids, pixel_values=px)
            kept[backend] = h.stats.kept_indices[0]
    assert torch.equal(kept["torch"], kept["triton"])


@pytest.mark.slow
def test_kernel_compiles_for_gpus():
    shared = compile_for_gpus(r'''
from vtoken.kernels.diversity.greedy import _greedy_kernel
types = {"gram_ptr": "*fp32", "pivot_ptr": "*i64", "out_ptr": "*i64", "n": "i32", "k": "i32"}
for arch in (80, 90):
    for maxmin in (False, True):
        shared[f"greedy maxmin={maxmin} sm_{arch}"] = compile_kernel(
            _greedy_kernel, types, {"MAXMIN": maxmin, "BLOCK": 16384}, arch).metadata.shared
''')
    assert len(shared) == 4 and all(size <= SMALLEST_SHARED_MEMORY for size in shared.values()), shared

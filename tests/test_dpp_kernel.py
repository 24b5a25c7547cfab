"""Greedy MAP of a DPP (CDPruner's selection): the batched PyTorch loop against the release's loop written out with
Python indices, and the Triton kernel (through the interpreter on a CPU) against the PyTorch loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vtoken.kernels.dpp import dpp_greedy_map
from vtoken.kernels.dpp.naive import dpp_greedy_map as naive_greedy_map


def release_greedy_map(kernel: torch.Tensor, k: int) -> list[int]:
    """The release's fast greedy MAP for one image (Chen et al., 2018), in float64."""
    n = kernel.shape[0]
    cis = torch.zeros(k, n, dtype=torch.float64)
    gains = kernel.diagonal().clone().double()
    picked = []
    for i in range(k):
        j = int(gains.argmax())
        picked.append(j)
        eis = (kernel[j].double() - cis[:i, j] @ cis[:i]) / gains[j].sqrt()
        cis[i] = eis
        gains -= eis**2
        gains[j] = float("-inf")
    return picked


def psd_kernels(B: int, n: int, rank: int, seed: int) -> torch.Tensor:
    """Relevance-weighted cosine kernels, as CDPruner builds them."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, n, rank, generator=g), dim=-1)
    r = torch.rand(B, n, generator=g) + 0.1
    return r[:, :, None] * (x @ x.transpose(1, 2)) * r[:, None, :]


@pytest.mark.parametrize("n, rank, k", [(50, 64, 10), (196, 256, 49), (37, 40, 30)])
def test_the_loop_equals_the_release(n, rank, k):
    kernels = psd_kernels(4, n, rank, seed=n)
    got = naive_greedy_map(kernels, k)
    assert got.tolist() == [release_greedy_map(kernel, k) for kernel in kernels]


def test_past_the_kernels_rank_every_pick_is_new():
    """A rank-8 kernel has 8 positive gains: the release would divide by ~0 after them; here every pick stays
    distinct and the first 8 are the release's."""
    kernel = psd_kernels(1, 30, 8, 0)
    picked = naive_greedy_map(kernel, 20)[0].tolist()
    assert len(set(picked)) == 20 and picked[:8] == release_greedy_map(kernel[0], 8)


@pytest.mark.parametrize("B, n, rank, k", [(1, 17, 32, 5), (3, 100, 128, 25), (2, 300, 96, 64)])
def test_the_triton_kernel_equals_the_loop(B, n, rank, k):
    kernels = psd_kernels(B, n, rank, seed=k)
    assert torch.equal(dpp_greedy_map(kernels, k, backend="triton"), dpp_greedy_map(kernels, k, backend="torch"))


def test_past_the_rank_the_kernel_and_the_loop_agree_up_to_the_rank():
    """Past the kernel's rank every gain is rounding noise, which the two summation orders make differently: both
    keep the same first ``rank`` tokens and never pick a token twice."""
    kernels = psd_kernels(2, 64, 16, seed=0)
    triton, torch_loop = dpp_greedy_map(kernels, 40, backend="triton"), dpp_greedy_map(kernels, 40, backend="torch")
    assert torch.equal(triton[:, :16], torch_loop[:, :16])
    assert all(len(set(row)) == 40 for row in triton.tolist())

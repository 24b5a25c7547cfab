"""Greedy MAP of a DPP (CDPruner): one dispatch point (``backend`` as in :mod:`vtoken.kernels.dispatch`).

On CUDA one persistent Triton program per image does every step; elsewhere the batched PyTorch loop of ``naive``.
"""

from __future__ import annotations

import torch

from vtoken.kernels.dispatch import use_triton
from vtoken.kernels.dpp import naive

MAX_TOKENS = 16384  # the kernel keeps one image's gains in one block; longer inputs use the loop


def dpp_greedy_map(kernel: torch.Tensor, k: int, backend: str = "auto") -> torch.Tensor:
    """(B, k) indices, in pick order, of the greedy MAP subsets of the DPPs with ``kernel`` (B, n, n), fp32."""
    if use_triton(kernel, backend) and kernel.shape[1] <= MAX_TOKENS:
        from vtoken.kernels.dpp.greedy import dpp_greedy_map_triton

        return dpp_greedy_map_triton(kernel, k)
    return naive.dpp_greedy_map(kernel.float(), k)


__all__ = ["dpp_greedy_map"]

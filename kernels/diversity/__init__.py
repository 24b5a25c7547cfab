"""Greedy diversity selection (ToDRE stage 1): one dispatch point (``backend`` as in :mod:`vtoken.kernels.dispatch`).

On CUDA: the similarity matrices by one batched matmul, then the persistent Triton kernel does all k steps of every
image in one launch. Elsewhere: the batched matrix-vector loop of ``naive``, which needs k*n*D FLOPs per image
instead of the matrix's n*n*D.
"""

from __future__ import annotations

import torch

from vtoken.kernels.dispatch import use_triton
from vtoken.kernels.diversity import naive

RULES = ("maxsum", "maxmin")
MAX_TOKENS = 16384  # the kernel keeps one image's running scores in one block; longer inputs use the loop


def greedy_select(x: torch.Tensor, k: int, pivot: torch.Tensor, rule: str = "maxsum",
                  backend: str = "auto") -> torch.Tensor:
    """(B, k) indices of rows of ``x`` (B, n, D, L2-normalised) in pick order, starting from ``pivot`` (B,)."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not allowed; choose one of {', '.join(map(repr, RULES))}")
    pivot = torch.as_tensor(pivot, device=x.device).reshape(x.shape[0])
    if use_triton(x, backend) and x.shape[1] <= MAX_TOKENS:
        from vtoken.kernels.diversity.greedy import greedy_from_gram_triton

        xf = x.float()
        return greedy_from_gram_triton(torch.bmm(xf, xf.transpose(1, 2)), k, pivot, rule == "maxmin")
    # fp32 similarities on both paths, so that half-precision features keep the same tokens either way
    return naive.greedy_from_features(x.float(), k, pivot, rule == "maxmin")


__all__ = ["RULES", "greedy_select"]

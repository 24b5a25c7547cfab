"""Greedy diversity selection (ToDRE stage 1): one dispatch point (``backend`` as in :mod:`vtoken.kernels.dispatch`).

On CUDA: the similarity matrix by one matmul, then the persistent Triton kernel does all k steps in one launch.
Elsewhere: the matrix-vector loop of ``naive``, which needs k*n*D FLOPs instead of the matrix's n*n*D.
"""

from __future__ import annotations

import torch

from vtoken.kernels.dispatch import use_triton
from vtoken.kernels.diversity import naive

RULES = ("maxsum", "maxmin")
MAX_TOKENS = 16384  # the kernel keeps one image's running scores in one block; longer inputs use the loop


def greedy_select(x: torch.Tensor, k: int, pivot: int | torch.Tensor, rule: str = "maxsum",
                  backend: str = "auto") -> torch.Tensor:
    """k indices of rows of ``x`` (n, D, L2-normalised) in pick order, starting from ``pivot``."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not allowed; choose one of {', '.join(map(repr, RULES))}")
    if use_triton(x, backend) and x.shape[0] <= MAX_TOKENS:
        from vtoken.kernels.diversity.greedy import greedy_from_gram_triton

        xf = x.float()
        gram = (xf @ xf.T).unsqueeze(0)
        pivot = torch.as_tensor(pivot, device=x.device).reshape(1)
        return greedy_from_gram_triton(gram, k, pivot, rule == "maxmin")[0]
    select = naive.maxmin_select if rule == "maxmin" else naive.maxsum_select
    return select(x, k, pivot)


__all__ = ["RULES", "greedy_select"]

"""Greedy diversity selection (ToDRE stage 1): one dispatch point (``backend`` as in :mod:`vtoken.kernels.dispatch`).

On CUDA: the similarity matrices by one batched matmul, then the persistent Triton kernel does all k steps of every
image in one launch. Elsewhere: the batched matrix-vector loop of ``naive``, which needs k*n*D FLOPs per image
instead of the matrix's n*n*D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtoken.kernels.dispatch import use_triton
from vtoken.kernels.diversity import naive

RULES = ("maxsum", "maxmin")
MAX_TOKENS = 16384  # the kernel keeps one image's running scores in one block; longer inputs use the loop
HALF = (torch.float16, torch.bfloat16)


def cosine_similarities(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, R, n) fp32 cosine similarities of the rows of ``a`` (B, R, D) with those of ``b`` (B, n, D), any scale.

    Half-precision rows are multiplied as they are and their norms divided out afterwards: the products of two
    half-precision numbers are exact in fp32 and the sums run in fp32, so this equals normalising in fp32 first (up
    to the order of the sums), while on CUDA the matmul runs on tensor cores. An fp32 matmul does not: at
    LLaVA-NeXT's 2,880 tokens of width 4,096 its 68 GFLOPs take at least 1 ms at an H100's fp32 peak, of the 2.3 ms
    measured there for the whole greedy selection.
    """
    with torch.autocast(a.device.type, enabled=False):  # an enclosing autocast would round the similarities
        if a.dtype in HALF and b.dtype == a.dtype:
            # out_dtype is CUDA's alone; on other devices the same exact products by upcasting first
            dots = torch.bmm(a, b.mT, out_dtype=torch.float32) if a.is_cuda else torch.bmm(a.float(), b.float().mT)
            inv_a = inverse_norms(a)
            inv_b = inv_a if b is a else inverse_norms(b)
            return dots * inv_a.unsqueeze(2) * inv_b.unsqueeze(1)
        unit_a = F.normalize(a.float(), dim=-1)
        unit_b = unit_a if b is a else F.normalize(b.float(), dim=-1)
        return torch.bmm(unit_a, unit_b.mT)


def inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / ||row|| in fp32, with F.normalize's floor on the norm."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).clamp_min(1e-12).reciprocal()


def selects_from_gram(x: torch.Tensor, backend: str) -> bool:
    """Whether ``greedy_select`` reads its similarities off the whole matrix (the Triton kernel) for these rows; a
    caller that needs the matrix anyway (DivPrune's first pick) computes it once and hands it over."""
    return use_triton(x, backend) and x.shape[1] <= MAX_TOKENS


def greedy_select(x: torch.Tensor, k: int, pivot: torch.Tensor, rule: str = "maxsum", backend: str = "auto",
                  gram: torch.Tensor | None = None) -> torch.Tensor:
    """(B, k) indices of rows of ``x`` (B, n, D, any scale: similarities are cosines) in pick order, starting from
    ``pivot`` (B,); ``gram``: their ``cosine_similarities`` (B, n, n), when the caller has them already."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not allowed; choose one of {', '.join(map(repr, RULES))}")
    pivot = torch.as_tensor(pivot, device=x.device).reshape(x.shape[0])
    if selects_from_gram(x, backend):
        from vtoken.kernels.diversity.greedy import greedy_from_gram_triton

        gram = cosine_similarities(x, x) if gram is None else gram
        return greedy_from_gram_triton(gram, k, pivot, rule == "maxmin")
    if gram is not None:
        return naive.greedy_from_gram(gram, k, pivot, rule == "maxmin")
    # fp32 similarities on both paths, so that half-precision features keep the same tokens either way
    return naive.greedy_from_features(F.normalize(x.float(), dim=-1), k, pivot, rule == "maxmin")


__all__ = ["RULES", "cosine_similarities", "greedy_select", "selects_from_gram"]

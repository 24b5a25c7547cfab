"""Attention-row scoring, one dispatch point (``backend`` as in :mod:`vtoken.kernels.dispatch`).

Only the PyTorch reference exists so far; it never holds more than a chunk of query rows' probabilities.
"""

from __future__ import annotations

import torch

from vtoken.kernels.attention import naive
from vtoken.kernels.dispatch import use_triton


def attention_received(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, weights: torch.Tensor,
                       scale: float, backend: str = "auto") -> torch.Tensor:
    """(B, K) attention each key receives from the weighted query rows, head-averaged (see ``naive``)."""
    if use_triton(q, backend) and backend == "triton":
        raise NotImplementedError("attention_received has no Triton kernel yet; use backend='auto' or 'torch'")
    return naive.attention_received(q, k, allowed, weights, scale)


__all__ = ["attention_received"]

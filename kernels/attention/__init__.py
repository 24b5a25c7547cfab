"""Attention-row scoring, one dispatch point (``backend`` as in :mod:`vtoken.kernels.dispatch`).

On CUDA two Triton launches (row statistics, then the reduction onto the keys) that never build the (B, H, R, K)
probabilities; elsewhere the PyTorch reference, which holds at most a chunk of query rows' probabilities.
"""

from __future__ import annotations

import torch

from vtoken.kernels.attention import naive
from vtoken.kernels.dispatch import use_triton


def attention_received(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, scale: float,
                       causal_rows: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
                       allowed: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """(B, K) fp32 attention each key receives from the weighted query rows, head-averaged (see ``naive``).

    ``q`` (B, Hq, R, D) and ``k`` (B, Hk, K, D) with RoPE applied, ``Hq`` a multiple of ``Hk``; ``weights`` (B, R).
    Masks (combined with AND, all optional): ``causal_rows`` (B, R) the key index each query row sits at,
    ``key_valid`` (B, K), ``allowed`` (B, R, K).
    """
    check_shapes(q, k, weights, causal_rows, key_valid, allowed)
    if use_triton(q, backend, eager_only=True):
        from vtoken.kernels.attention.received import attention_received_triton

        return attention_received_triton(q, k, weights, scale, causal_rows, key_valid, allowed)
    return naive.attention_received(q, k, weights, scale, causal_rows, key_valid, allowed)


def check_shapes(q, k, weights, causal_rows, key_valid, allowed) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention_received: q must be (B, Hq, R, D) and k (B, Hk, K, D); got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    B, Hq, R, _ = q.shape
    Hk, K = k.shape[1], k.shape[2]
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"attention_received: query heads ({Hq}) must be a multiple of key heads ({Hk})")
    for name, tensor, shape in (("weights", weights, (B, R)), ("causal_rows", causal_rows, (B, R)),
                                ("key_valid", key_valid, (B, K)), ("allowed", allowed, (B, R, K))):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"attention_received: {name} must have shape {shape}; got {tuple(tensor.shape)}")


__all__ = ["attention_received"]

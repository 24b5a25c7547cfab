"""PyTorch definition of the greedy MAP of a determinantal point process (CDPruner), the reference of the Triton
kernel. Batched over images of one length: kernels (B, n, n) in, (B, k) indices in pick order out.

Fast greedy MAP (Chen et al., 2018): every token's residual gain ``d_j`` starts at ``L_jj``; each step picks the
largest gain (the first index on a tie), computes the new row of the Cholesky factor of the kept set,
``e = (L_j - c_j . C) / sqrt(d_j)``, and lowers every gain by ``e**2``. Past the kernel's rank the gains are ~0:
a pick whose gain is at most ``eps`` adds a zero row instead of dividing by it, so the remaining picks go by the
largest residual gain and no token is picked twice.
"""

from __future__ import annotations

import torch


def dpp_greedy_map(kernel: torch.Tensor, k: int, eps: float = 1e-10) -> torch.Tensor:
    """(B, k) indices of the greedy MAP subsets of the DPPs with ``kernel`` (B, n, n), PSD, fp32. No step reads the
    device: one row gather and one batched matrix-vector product per step."""
    B, n, _ = kernel.shape
    rows = kernel.new_zeros(B, k, n)  # Cholesky rows so far, row t of image b at rows[b, t]; unwritten rows are zero
    gains = kernel.diagonal(dim1=1, dim2=2).clone()
    picked = []
    for i in range(k):
        j = gains.argmax(1, keepdim=True)  # (B, 1)
        picked.append(j)
        gain = gains.gather(1, j)
        column = rows.gather(2, j.unsqueeze(1).expand(B, k, 1)).transpose(1, 2)  # (B, 1, k): c_j
        update = (kernel.gather(1, j.unsqueeze(2).expand(B, 1, n)) - column @ rows).squeeze(1)
        update = update * ((gain > eps) * gain.clamp_min(eps).rsqrt())
        rows[:, i] = update
        gains = gains.sub_(update.square()).scatter_(1, j, float("-inf"))
    return torch.cat(picked, dim=1)

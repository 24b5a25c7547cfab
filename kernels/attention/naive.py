"""PyTorch definition of attention-row scoring: how much attention chosen query rows give each key.

``received[b, k] = sum_r weights[b, r] * mean_h softmax_k(scale * q[b, h, r] . k[b, h // G, k] | allowed[b, r, k])``
with GQA groups ``G = Hq / Hk``. The softmax is in fp32; a row with no allowed key contributes nothing. This is the
primitive behind attn_topk (FastV), ToDRE's stage-2 ratios and TransPrune's instruction-guided attention.
"""

from __future__ import annotations

import torch


def attention_received(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, weights: torch.Tensor,
                       scale: float, chunk: int = 128) -> torch.Tensor:
    """(B, Hq, R, D) queries, (B, Hk, K, D) keys, (B, R, K) bool mask, (B, R) row weights -> (B, K) fp32.

    Rows are taken ``chunk`` at a time, so at most (B, Hq, chunk, K) probabilities exist at once.
    """
    B, Hq, R, _ = q.shape
    group = Hq // k.shape[1]
    keys = k.float().repeat_interleave(group, dim=1)
    out = torch.zeros(B, k.shape[2], dtype=torch.float32, device=q.device)
    for start in range(0, R, chunk):
        part = slice(start, min(R, start + chunk))
        scores = torch.matmul(q[:, :, part].float(), keys.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed[:, None, part], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).mean(dim=1)  # (B, r, K)
        out += torch.einsum("br,brk->bk", weights[:, part].float(), probs)
    return out

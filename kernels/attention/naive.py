"""PyTorch definition of attention-row scoring: how much attention chosen query rows give each key.

``received[b, k] = sum_r weights[b, r] * mean_h softmax_k(scale * q[b, h, r] . k[b, h // G, k] | allowed[b, r, k])``
with GQA groups ``G = Hq / Hk``. The softmax is in fp32; a row with no allowed key contributes nothing. This is the
primitive behind attn_topk (FastV), ToDRE's stage-2 ratios and TransPrune's instruction-guided attention.

Which keys a row may attend to is the AND of up to three parts, so that the common cases need no (B, R, K) mask:
``causal_rows`` (B, R), the key index each row sits at (keys up to it are allowed); ``key_valid`` (B, K), keys any
row may attend to (padding and filler slots are not); ``allowed`` (B, R, K), a dense mask for everything else
(custom 4-D attention masks). None of them: every key is allowed.
"""

from __future__ import annotations

import torch


def allowed_keys(batch: int, rows: int, keys: int, device, causal_rows: torch.Tensor | None = None,
                 key_valid: torch.Tensor | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The (B, R, K) bool mask the three optional parts describe."""
    out = torch.ones(batch, rows, keys, dtype=torch.bool, device=device)
    if causal_rows is not None:
        out = out & (torch.arange(keys, device=device).view(1, 1, keys) <= causal_rows.unsqueeze(2))
    if key_valid is not None:
        out = out & key_valid.bool().unsqueeze(1)
    if allowed is not None:
        out = out & allowed.bool()
    return out


def attention_received(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, scale: float,
                       causal_rows: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
                       allowed: torch.Tensor | None = None, chunk: int = 128) -> torch.Tensor:
    """(B, Hq, R, D) queries, (B, Hk, K, D) keys, (B, R) row weights, masks as above -> (B, K) fp32.

    Rows are taken ``chunk`` at a time, so at most (B, Hq, chunk, K) probabilities exist at once.
    """
    B, Hq, R, _ = q.shape
    K = k.shape[2]
    group = Hq // k.shape[1]
    keys = k.float().repeat_interleave(group, dim=1)
    out = torch.zeros(B, K, dtype=torch.float32, device=q.device)
    for start in range(0, R, chunk):
        part = slice(start, min(R, start + chunk))
        mask = allowed_keys(B, part.stop - start, K, q.device,
                            None if causal_rows is None else causal_rows[:, part], key_valid,
                            None if allowed is None else allowed[:, part])
        scores = torch.matmul(q[:, :, part].float(), keys.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).mean(dim=1)  # (B, r, K)
        out += torch.einsum("br,brk->bk", weights[:, part].float(), probs)
    return out

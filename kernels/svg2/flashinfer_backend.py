"""SVG2's sparse attention through FlashInfer's variable-block sparse attention (the backend of the authors' release),
an optional alternative to the Triton kernel when ``flashinfer`` imports (``backend="flashinfer"``).

FlashInfer takes the block layout itself rather than our key ranges: per head, the query clusters' sizes (block
rows), the key clusters' sizes (block columns) and the (Cq, Ck) mask of kept cluster pairs, over the same permuted
tokens. Extra keys every query attends (HunyuanVideo's valid text tokens) are one more always-kept column block, and
the padding after them one never-kept block, so every head has the same number of keys, as FlashInfer requires.
Its ``plan`` expands the blocks to token indices and copies them to the host (device syncs), once per call.
"""

from __future__ import annotations

import functools

import torch

WORKSPACE_BYTES = 128 * 1024 * 1024  # the size FlashInfer's documentation recommends


@functools.cache
def available() -> bool:
    try:
        import flashinfer.sparse  # noqa: F401
    except Exception:  # ImportError, or a build that fails to load without its CUDA libraries
        return False
    return True


def block_layout(q_sizes: torch.Tensor, k_sizes: torch.Tensor, keep: torch.Tensor,
                 extra_keys: torch.Tensor | None = None, extra_rows: int = 0):
    """(mask (BH, Cq, Ck'), row sizes (BH, Cq), column sizes (BH, Ck')) in FlashInfer's terms: ``keep`` over the
    clusters' sizes, plus, with ``extra_rows`` rows stored after the clustered keys, a kept block of each head's
    ``extra_keys`` and a skipped block of the rest."""
    mask, cols = keep, k_sizes
    if extra_rows:
        bh, cq = keep.shape[:2]
        extra = extra_keys.to(k_sizes.dtype).view(bh, 1)
        cols = torch.cat([k_sizes, extra, extra_rows - extra], dim=1)
        mask = torch.cat([keep, keep.new_ones(bh, cq, 1), keep.new_zeros(bh, cq, 1)], dim=2)
    return mask.bool().contiguous(), q_sizes.to(torch.int32).contiguous(), cols.to(torch.int32).contiguous()


def element_mask(mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(BH, Nq, Nk) the token pairs a FlashInfer block layout lets attend: block (i, j) of head h covers the rows of
    block row i and the columns of block column j. The definition the layout is tested against."""
    row_of = torch.stack([torch.repeat_interleave(torch.arange(r.numel()), r.long().cpu()) for r in rows])
    col_of = torch.stack([torch.repeat_interleave(torch.arange(c.numel()), c.long().cpu()) for c in cols])
    per_row = mask.cpu().gather(1, row_of.unsqueeze(-1).expand(-1, -1, mask.shape[2]))
    return per_row.gather(2, col_of.unsqueeze(1).expand(-1, row_of.shape[1], -1)).to(mask.device)


@functools.cache
def _wrapper(device: torch.device):
    import flashinfer.sparse

    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return flashinfer.sparse.VariableBlockSparseAttentionWrapper(workspace, backend="auto")


def flashinfer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
                         cols: torch.Tensor, scale: float) -> torch.Tensor:
    """``q`` (BH, Nq, D), ``k`` / ``v`` (BH, Nk, D) in the permuted layout, attention restricted to the block layout
    of :func:`block_layout`: plan, then run."""
    if not q.is_cuda:
        raise ValueError("backend='flashinfer' runs on CUDA tensors only; use 'triton' or 'torch' here")
    if not available():
        raise RuntimeError("backend='flashinfer' needs the flashinfer-python package, which does not import here")
    bh, _, d = q.shape
    wrapper = _wrapper(q.device)
    wrapper.plan(mask, rows, cols, bh, bh, d, sm_scale=scale, q_data_type=q.dtype)
    return wrapper.run(q.contiguous(), k.contiguous(), v.contiguous())


__all__ = ["available", "block_layout", "element_mask", "flashinfer_attention"]

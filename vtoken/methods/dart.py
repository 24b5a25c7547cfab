"""DART (Wen et al., 2025, arXiv 2502.11494): keep the visual tokens that duplicate the pivots least.

Inside the LLM, at the input of (0-based) layer K (default 2), a few pivot tokens are chosen: the visual tokens and
the instruction tokens (every real token after the image) whose key states at layer K-1 have the largest L1 norm
(4 of each by default). Each pivot in turn then takes the candidate visual tokens least similar to it (cosine of the
hidden states after the decoder's final norm) and removes them from the pool; the image pivots and the visual tokens
the pivots took go on, the others are dropped from layer K on. No attention map is read, so the model keeps SDPA /
FlashAttention.

Written from the paper and the official release (Apache-2.0), with four choices of ours (docs/dart.md): the pivots'
key norms are taken before RoPE (so the choice does not depend on where the prompt sits), the budget is met exactly
(the release keeps its four image pivots on top of it, 132 for "128"), the pivots take their turns in position order
(the release's order is a Python set's), and the per-pivot shares split the budget exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtoken.budget import resolve_budget
from vtoken.checks import check_choice, check_int
from vtoken.kernels.dispatch import BACKENDS
from vtoken.methods.base import LayerContext, VisualTokenMethod, instruction_rows
from vtoken.registry import register_method


def top_rows(scores: torch.Tensor, members: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) the ``k`` highest-scoring rows among ``members`` per sample (ties: the earlier row), and (B, k) whether
    each is a member (a sample with fewer members gets non-members at the end)."""
    k = min(k, scores.shape[1])
    order = torch.where(members, scores.float(), float("-inf")).argsort(dim=1, descending=True, stable=True)[:, :k]
    return order, members.gather(1, order)


def shares(total: torch.Tensor, parts: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) ``total`` (B,) split over the first ``parts`` (B,) slots as evenly as integers allow, the earlier
    slots taking the remainder; 0 beyond ``parts``."""
    slots = torch.arange(width, device=total.device)
    parts = parts.clamp(min=1).unsqueeze(1)
    base, extra = total.unsqueeze(1) // parts, total.unsqueeze(1) % parts
    return torch.where(slots < parts, base + (slots < extra).long(), 0)


def dart_select(hidden: torch.Tensor, pivot_scores: torch.Tensor, visual: torch.Tensor, text: torch.Tensor,
                budgets: list[int], image_pivots: int, text_pivots: int) -> torch.Tensor:
    """(B, L) the visual tokens DART keeps: ``hidden`` (B, L, D) the features similarities are measured on,
    ``pivot_scores`` (B, L) what ranks the pivots, ``visual`` / ``text`` (B, L) the candidate and text-pivot rows,
    ``budgets`` the visual tokens each sample keeps (on the host)."""
    B, L = visual.shape
    device = visual.device
    budget = torch.tensor(budgets, device=device)
    img, img_ok = top_rows(pivot_scores, visual, image_pivots)
    img_ok &= torch.arange(img.shape[1], device=device) < budget.clamp(max=image_pivots).unsqueeze(1)
    txt, txt_ok = top_rows(pivot_scores, text, text_pivots)
    pivots, ok = torch.cat([img, txt], 1), torch.cat([img_ok, txt_ok], 1)
    # pivots take their turns in position order; invalid ones go last and take nothing
    order = torch.where(ok, pivots, L + pivots).argsort(dim=1)
    pivots, ok = pivots.gather(1, order), ok.gather(1, order)
    kept = torch.zeros(B, L, dtype=torch.bool, device=device).scatter(1, img, img_ok)  # distinct rows per sample
    taken = shares(budget - img_ok.sum(1), ok.sum(1), pivots.shape[1]) * ok
    features = F.normalize(hidden.float(), dim=-1)
    pool = visual & ~kept
    rows = torch.arange(B, device=device)
    for j in range(pivots.shape[1]):
        similarity = (features * features[rows, pivots[:, j]].unsqueeze(1)).sum(-1)  # (B, L) cosine
        order = torch.where(pool, similarity, float("inf")).argsort(dim=1, stable=True)  # least similar first
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=device).expand(B, L))
        take = pool & (rank < taken[:, j : j + 1])
        kept |= take
        pool &= ~take
    return kept


@register_method("dart", stages=("in_llm",))
@dataclass
class DARTConfig(VisualTokenMethod):
    """DART: at the input of layer ``layer``, keep the visual tokens least similar to a few pivots.

    ``keep``: visual tokens kept (int, or fraction of each sample's; the release's 128 of 576 is 0.222).
    ``layer``: the (0-based) layer from which the dropped tokens are gone (1 ... L-1; the release's 2).
    ``image_pivots`` / ``text_pivots``: pivots among the visual tokens and among the instruction tokens (4 and 4),
    ranked by the L1 norm of their key states (before RoPE) at layer ``layer - 1``. ``backend`` picks the compaction
    kernel.
    """

    keep: int | float = 0.222
    layer: int = 2
    image_pivots: int = 4
    text_pivots: int = 4
    backend: str = "auto"
    prune_at_scored_layer = True

    def __post_init__(self):
        super().__post_init__()
        check_int(self.layer, "layer", 1)
        check_int(self.image_pivots, "image_pivots", 1)
        check_int(self.text_pivots, "text_pivots", 0)
        check_choice(self.backend, "backend", BACKENDS)

    def score_layers(self, num_layers: int) -> tuple[int, ...]:
        check_int(self.layer, "layer", 1, num_layers - 1)
        return (self.layer - 1, self.layer)  # the pivots' keys, then the drop

    def prune(self, ctx: LayerContext) -> torch.Tensor:
        if ctx.layer == self.layer - 1:  # the pivots' ranking: L1 norms of this layer's keys; nothing goes yet
            ctx.state["pivot_scores"] = ctx.keys().float().abs().sum(dim=(1, 3))  # (B, L)
            ctx.kept = list(ctx.visual_counts) if ctx.visual_counts is not None else None
            return torch.ones_like(ctx.visual)
        budgets = [resolve_budget(self.keep, n) for n in ctx.n_visual_input]
        hidden = ctx.final_norm(ctx.hidden) if ctx.final_norm is not None else ctx.hidden
        kept = dart_select(hidden, ctx.state.pop("pivot_scores"), ctx.visual, instruction_rows(ctx), budgets,
                           self.image_pivots, self.text_pivots)
        ctx.record.update(kept=budgets)
        ctx.kept = budgets
        return kept | ~ctx.visual

"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): a few dominant tokens plus a few merged contextual ones.

At the vision layer whose output the projector reads: the **dominant** tokens are the patches that receive the most
attention (from the [CLS] token in a tower with one, averaged over every query in one without, as the release's
SigLIP port does), averaged over heads; the **contextual** tokens summarise the rest. Of the remaining tokens (in
raster order), every ``R // C``-th is a target; every other remaining token joins the target whose key (that layer's
key states, averaged over heads) is most cosine-similar, and each contextual token is its target plus the mean of
the tokens that joined it.

Written from the paper and the official release (Apache-2.0): the release's LLaVA-1.5 split of 64 tokens is 54
dominant (the [CLS] token included) and 10 contextual; other budgets keep that share. On LLaVA-1.5 a bridge runs the
release's rule before the projector, [CLS] included whatever ``vision_feature_select_strategy`` says. On the other
hosts VisionZip is a boundary method that reads the tower through ``ImageContext.tower`` (the "tower_attention"
stage) and selects and merges projected tokens: dominant tokens keep their places, a contextual token takes its
target's. Needs neither eager attention nor ``output_attentions``: attention and keys are recomputed from the layer's
input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtoken.budget import resolve_budget, round_half_up
from vtoken.checks import check_int
from vtoken.methods.base import ImageContext, Reduction, VisualTokenMethod
from vtoken.registry import register_method

RELEASE_SPLIT = (54, 10)  # dominant ([CLS] included), contextual: the release's LLaVA-1.5 setting of 64 tokens


def split_budget(total: int, contextual: int | None) -> tuple[int, int]:
    """(dominant, contextual) tokens of a ``total`` budget: the release's share of contextual ones (10 of 64)
    unless ``contextual`` is given; at least one token (the [CLS] token on LLaVA-1.5) is dominant."""
    if contextual is None:
        contextual = round_half_up(total * RELEASE_SPLIT[1] / sum(RELEASE_SPLIT))
    contextual = min(contextual, total - 1)
    return total - contextual, contextual


def contextual_targets(remaining: int, contextual: int) -> list[int]:
    """Indices, among the ``remaining`` non-dominant tokens, of the contextual targets: every ``remaining //
    contextual``-th from the first (the release's rule)."""
    step = max(1, remaining // contextual)
    return list(range(0, remaining, step))[:contextual]


def zip_selection(attention: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int):
    """VisionZip's choice among T tokens of each of V views, as indices into them: ``chosen`` (V, dominant) the
    dominant tokens, ascending; ``targets`` (V, contextual) the contextual targets; ``others`` (V, R - contextual) the
    remaining tokens and ``joins`` (V, R - contextual) the slot of the target each joins.

    ``attention`` (V, T): what ranks the dominant tokens; ``keys`` (V, T, d): what the others are matched by."""
    V, T = attention.shape
    chosen = attention.float().topk(dominant, dim=1).indices.sort(dim=1).values
    if contextual == 0:
        empty = chosen.new_zeros(V, 0)
        return chosen, empty, empty, empty
    is_dominant = torch.zeros(V, T, dtype=torch.bool, device=attention.device).scatter(1, chosen, True)
    rest = is_dominant.to(torch.uint8).argsort(dim=1, stable=True)[:, : T - dominant]  # the others, raster order
    target_slots = contextual_targets(T - dominant, contextual)
    other_slots = sorted(set(range(T - dominant)) - set(target_slots))
    targets = rest[:, torch.tensor(target_slots, device=rest.device)]
    others = rest[:, torch.tensor(other_slots, dtype=torch.long, device=rest.device)]
    normed = F.normalize(keys.float(), dim=-1)
    d = normed.shape[-1]
    similarity = (normed.gather(1, others.unsqueeze(-1).expand(-1, -1, d))
                  @ normed.gather(1, targets.unsqueeze(-1).expand(-1, -1, d)).transpose(1, 2))
    return chosen, targets, others, similarity.argmax(-1)


def merged_tokens(hidden: torch.Tensor, targets: torch.Tensor, others: torch.Tensor, joins: torch.Tensor
                  ) -> torch.Tensor:
    """(V, contextual, C) fp32 each target of ``hidden`` (V, T, C) plus the mean of the tokens that joined it (the
    release's formula; a target nobody joined is itself)."""
    V, _, C = hidden.shape
    pick = lambda index: hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, C)).float()  # noqa: E731
    sums = torch.zeros(V, targets.shape[1], C, device=hidden.device).scatter_add_(
        1, joins.unsqueeze(-1).expand(-1, -1, C), pick(others))
    counts = torch.zeros(V, targets.shape[1], device=hidden.device).scatter_add_(
        1, joins, torch.ones_like(joins, dtype=torch.float32))
    return pick(targets) + sums / counts.clamp(min=1).unsqueeze(-1)


def visionzip_tokens(hidden: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, dominant: int,
                     contextual: int) -> torch.Tensor:
    """(V, dominant + contextual, C) the tokens the release keeps of each view, before the projector: the [CLS] token
    and the top patches in raster order, then the contextual tokens.

    ``hidden`` (V, T, C): the layer's output, [CLS] first; ``cls_attention`` (V, T): the [CLS] token's attention
    over the same tokens; ``keys`` (V, T, d): the layer's keys, averaged over heads."""
    forced = cls_attention.float().clone()
    forced[:, 0] = float("inf")  # the [CLS] token is always dominant
    chosen, targets, others, joins = zip_selection(forced, keys, dominant, contextual)
    C = hidden.shape[-1]
    out = hidden.gather(1, chosen.unsqueeze(-1).expand(-1, -1, C))
    return torch.cat([out, merged_tokens(hidden, targets, others, joins).to(hidden.dtype)], 1)


def patch_tokens(ctx: ImageContext) -> torch.Tensor:
    """(m,) the indices of an item's patch tokens (those inside its grids, not separators), ascending."""
    return torch.cat([segment.patch_index().flatten() for segment in ctx.segments]).sort().values


@register_method("visionzip", stages=("boundary", "tower_attention"))
@dataclass
class VisionZipConfig(VisualTokenMethod):
    """VisionZip: per image, ``keep`` tokens (int, or a fraction of its patch tokens) reach the LLM, dominant ones
    by the vision tower's attention plus merged contextual ones.

    ``contextual``: how many of them are contextual; None = the release's share (10 of 64, so 54 + 10 at 64,
    108 + 20 at 128, 162 + 30 at 192).
    """

    keep: int | float = 64
    contextual: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.contextual is not None:
            check_int(self.contextual, "contextual", 0)
            if isinstance(self.keep, int) and self.contextual >= self.keep:
                raise ValueError(f"contextual={self.contextual} must be below keep={self.keep} (at least one token "
                                 "is a dominant one)")

    def split(self, patches: int) -> tuple[int, int]:
        """(dominant, contextual) tokens per view of ``patches`` patch tokens."""
        total = resolve_budget(self.keep, patches, what="visual tokens per image")
        if total < 2 and (self.contextual or 0) > 0:
            raise ValueError(f"keep={self.keep} leaves {total} token per image, which cannot hold contextual ones")
        return split_budget(total, self.contextual)

    def reduce(self, features: torch.Tensor, ctx: ImageContext) -> Reduction:
        return self.reduce_batch([(features, ctx)])[0]

    def reduce_batch(self, images: list[tuple[torch.Tensor, ImageContext]]) -> list[Reduction]:
        """Items with the same token layout (InternVL's tiles, a batch's LLaVA-NeXT images of one size) are reduced
        together, as one stack."""
        groups: dict[tuple, list[int]] = {}
        for i, (features, ctx) in enumerate(images):
            groups.setdefault((ctx.n, tuple(ctx.segments), features.device), []).append(i)
        out: list[Reduction | None] = [None] * len(images)
        for members in groups.values():
            for i, reduction in zip(members, self.reduce_same_layout([images[i] for i in members])):
                out[i] = reduction
        return out

    def reduce_same_layout(self, images: list[tuple[torch.Tensor, ImageContext]]) -> list[Reduction]:
        towers = [ctx.tower() for _, ctx in images]
        if any(tower is None for tower in towers):
            raise RuntimeError("visionzip: the host could not map the vision tower's attention onto this item's "
                               "tokens (a clustering tower, or features not taken from one tower layer)")
        features, ctx = torch.stack([f for f, _ in images]), images[0][1]
        patches = patch_tokens(ctx).to(features.device)
        dominant, contextual = self.split(patches.shape[0])
        chosen, targets, others, joins = zip_selection(torch.stack([t.attention for t in towers])[:, patches],
                                                       torch.stack([t.keys for t in towers])[:, patches],
                                                       dominant, contextual)
        kept = patches[chosen]  # ascending: the chosen slots are, and so are the patches
        C = features.shape[-1]
        selected = features.gather(1, kept.unsqueeze(-1).expand(-1, -1, C))
        if contextual == 0:
            return [Reduction(features=selected[g], kept=kept[g]) for g in range(len(images))]
        merged = merged_tokens(features[:, patches], targets, others, joins).to(features.dtype)
        places, order = torch.cat([kept, patches[targets]], 1).sort(dim=1)
        tokens = torch.cat([selected, merged], 1).gather(1, order.unsqueeze(-1).expand(-1, -1, C))
        frames = None if ctx.frames is None else ctx.frames.to(features.device)[places]
        return [Reduction(features=tokens[g], anchors=places[g], frames=None if frames is None else frames[g])
                for g in range(len(images))]


__all__ = ["RELEASE_SPLIT", "VisionZipConfig", "contextual_targets", "merged_tokens", "patch_tokens", "split_budget",
           "visionzip_tokens", "zip_selection"]

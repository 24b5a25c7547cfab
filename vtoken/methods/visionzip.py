"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): a few dominant tokens plus a few merged contextual ones,
chosen in the vision tower before the projector.

At the vision layer whose output the projector reads: the **dominant** tokens are the [CLS] token and the patches
the [CLS] token attends to most (that layer's attention, averaged over heads); the **contextual** tokens summarise
the rest. Of the remaining tokens (in raster order), every ``R // C``-th is a target; every other remaining token
joins the target whose key (that layer's key states, averaged over heads) is most cosine-similar, and each
contextual token is its target plus the mean of the tokens that joined it. The projector then maps the
``dominant + contextual`` tokens, and the LLM sees that many per image, dominant first, in raster order.

Written from the paper and the official release (Apache-2.0): the release's LLaVA-1.5 split of 64 tokens is 54
dominant (the [CLS] token included) and 10 contextual; other budgets keep that share. The release keeps the [CLS]
token whatever ``vision_feature_select_strategy`` says, and so does vtoken. Needs neither eager attention nor
``output_attentions``: the attention and the keys are recomputed from the layer's input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtoken.budget import check_budget, resolve_budget, round_half_up
from vtoken.checks import check_int
from vtoken.registry import register_method

RELEASE_SPLIT = (54, 10)  # dominant ([CLS] included), contextual: the release's LLaVA-1.5 setting of 64 tokens


def split_budget(total: int, contextual: int | None) -> tuple[int, int]:
    """(dominant, contextual) tokens of a ``total`` budget: the release's share of contextual ones (10 of 64)
    unless ``contextual`` is given; at least the [CLS] token is dominant."""
    if contextual is None:
        contextual = round_half_up(total * RELEASE_SPLIT[1] / sum(RELEASE_SPLIT))
    contextual = min(contextual, total - 1)
    return total - contextual, contextual


def contextual_targets(remaining: int, contextual: int) -> list[int]:
    """Indices, among the ``remaining`` non-dominant tokens, of the contextual targets: every ``remaining //
    contextual``-th from the first (the release's rule)."""
    step = max(1, remaining // contextual)
    return list(range(0, remaining, step))[:contextual]


def visionzip_tokens(hidden: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, dominant: int,
                     contextual: int) -> torch.Tensor:
    """(V, dominant + contextual, C) the tokens VisionZip keeps of each view.

    ``hidden`` (V, T, C): the layer's output, [CLS] first; ``cls_attention`` (V, T): the [CLS] token's attention
    over the same tokens; ``keys`` (V, T, d): the layer's keys, averaged over heads."""
    V, T, C = hidden.shape
    top = cls_attention[:, 1:].float().topk(dominant - 1, dim=1).indices.sort(dim=1).values + 1
    chosen = torch.cat([torch.zeros(V, 1, dtype=torch.long, device=hidden.device), top], 1)
    out = hidden.gather(1, chosen.unsqueeze(-1).expand(-1, -1, C))
    if contextual == 0:
        return out
    is_dominant = torch.zeros(V, T, dtype=torch.bool, device=hidden.device).scatter(1, chosen, True)
    rest = is_dominant.to(torch.uint8).argsort(dim=1, stable=True)[:, : T - dominant]  # the others, raster order
    rest_hidden = hidden.gather(1, rest.unsqueeze(-1).expand(-1, -1, C)).float()
    rest_keys = F.normalize(keys.gather(1, rest.unsqueeze(-1).expand(-1, -1, keys.shape[-1])).float(), dim=-1)
    targets = contextual_targets(T - dominant, contextual)
    others = sorted(set(range(T - dominant)) - set(targets))
    targets_t = torch.tensor(targets, device=hidden.device)
    others_t = torch.tensor(others, dtype=torch.long, device=hidden.device)
    joins = (rest_keys[:, others_t] @ rest_keys[:, targets_t].transpose(1, 2)).argmax(-1)  # (V, R - C)
    sums = torch.zeros(V, len(targets), C, device=hidden.device).scatter_add_(
        1, joins.unsqueeze(-1).expand(-1, -1, C), rest_hidden[:, others_t])
    counts = torch.zeros(V, len(targets), device=hidden.device).scatter_add_(
        1, joins, torch.ones_like(joins, dtype=torch.float32))
    merged = rest_hidden[:, targets_t] + sums / counts.clamp(min=1).unsqueeze(-1)
    return torch.cat([out, merged.to(hidden.dtype)], 1)


@register_method("visionzip", stages=("projector",))
@dataclass
class VisionZipConfig:
    """VisionZip: per image, ``keep`` tokens (int, or a fraction of its patch tokens) reach the LLM, dominant ones
    by the vision tower's [CLS] attention plus merged contextual ones.

    ``contextual``: how many of them are contextual; None = the release's share (10 of 64, so 54 + 10 at 64,
    108 + 20 at 128, 162 + 30 at 192).
    """

    keep: int | float = 64
    contextual: int | None = None

    def __post_init__(self):
        self.keep = check_budget(self.keep)
        if self.contextual is not None:
            check_int(self.contextual, "contextual", 0)
            if isinstance(self.keep, int) and self.contextual >= self.keep:
                raise ValueError(f"contextual={self.contextual} must be below keep={self.keep} (the [CLS] token is "
                                 "always a dominant token)")

    def split(self, patches: int) -> tuple[int, int]:
        """(dominant, contextual) tokens per view of ``patches`` patch tokens."""
        total = resolve_budget(self.keep, patches, what="visual tokens per image")
        if total < 2 and (self.contextual or 0) > 0:
            raise ValueError(f"keep={self.keep} leaves {total} token per image, which cannot hold contextual ones")
        return split_budget(total, self.contextual)


__all__ = ["RELEASE_SPLIT", "VisionZipConfig", "contextual_targets", "split_budget", "visionzip_tokens"]

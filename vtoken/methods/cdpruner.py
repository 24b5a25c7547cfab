"""CDPruner (Zhang et al., NeurIPS 2025): keep the visual tokens that a determinantal point process conditioned on
the instruction finds most diverse.

The kernel over an image's projected tokens is ``L_ij = r_i * cos(x_i, x_j) * r_j``: cosine similarity of the tokens
after the projector, weighted by each token's relevance ``r`` to the instruction. The kept subset is the greedy MAP
of that DPP (Chen et al.'s fast incremental Cholesky update): each step takes the token with the largest residual
gain, so a token similar to one already kept, or irrelevant to the instruction, comes late.

Relevance: the release pairs LLaVA's CLIP tower with CLIP's text tower (loaded beside the model) and uses the
negated mean cosine between each patch embedding and the instruction's text embeddings, min-max normalised per
image. Hugging Face VLMs ship no text tower, so here both sides live in the LLM's input space: the projected visual
tokens against the LLM's input embeddings of the instruction (the text after the prompt's last visual token), with
the release's sign and normalisation (``relevance="release"``); ``relevance="similar"`` keeps the sign (closer to the
instruction = more relevant) and ``relevance="uniform"`` drops the condition (a plain DPP over similarity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vtoken.budget import resolve_budget
from vtoken.checks import check_choice
from vtoken.kernels.dispatch import BACKENDS
from vtoken.kernels.dpp import dpp_greedy_map
from vtoken.methods.base import ImageContext, Reduction, VisualTokenMethod
from vtoken.registry import register_method

RELEVANCE = ("release", "similar", "uniform")


def instruction_relevance(x: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, sign: float) -> torch.Tensor:
    """(n,) fp32 relevance of the tokens ``x`` (n, D) to the instruction tokens ``mask`` (L,) of ``embeds`` (L, D):
    ``sign`` x the mean cosine, min-max normalised as the release does (the denominator gains 1e-6 too, so a
    constant relevance, e.g. no instruction at all, weighs every token alike instead of dividing by zero)."""
    text = F.normalize(embeds.float(), dim=-1) * mask.unsqueeze(1)
    mean = text.sum(0) / mask.sum().clamp_min(1)  # mean of the instruction's unit vectors: one matrix-vector product
    relevance = sign * (F.normalize(x.float(), dim=-1) @ mean)
    low = relevance.amin()
    return (relevance - low + 1e-6) / (relevance.amax() - low + 1e-6)


@register_method("cdpruner", stages=("boundary",))
@dataclass
class CDPrunerConfig(VisualTokenMethod):
    """CDPruner: greedy MAP of a DPP whose kernel is token similarity weighted by relevance to the instruction,
    after the projector, per image or video (``relevance``: ``"release"``, ``"similar"`` or ``"uniform"``; see the
    module docstring). ``keep`` as for every boundary method; the release keeps 64 of LLaVA-1.5's 576."""

    relevance: str = "release"
    backend: str = "auto"
    conditioned: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.relevance, "relevance", RELEVANCE)
        check_choice(self.backend, "backend", BACKENDS)

    def reduce(self, features: torch.Tensor, ctx: ImageContext) -> Reduction:
        return self.reduce_batch([(features, ctx)])[0]

    def reduce_batch(self, images: list[tuple[torch.Tensor, ImageContext]]) -> list[Reduction]:
        """Images of one length and budget share one greedy loop (one kernel launch on CUDA)."""
        out: list[Reduction | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (features, ctx) in enumerate(images):
            k = resolve_budget(self.keep, ctx.n)
            if k >= ctx.n:
                out[i] = Reduction(features, None)
            else:
                groups.setdefault((ctx.n, k), []).append(i)
        for (_, k), members in groups.items():
            with torch.autocast(images[members[0]][0].device.type, enabled=False):  # fp32 even under autocast
                kernels = torch.stack([self.kernel(*images[i]) for i in members])
                kept = dpp_greedy_map(kernels, k, self.backend).sort(dim=1).values
            for i, indices in zip(members, kept):
                out[i] = Reduction(images[i][0].index_select(0, indices), indices)
        return out

    def kernel(self, features: torch.Tensor, ctx: ImageContext) -> torch.Tensor:
        """(n, n) fp32: cosine similarity, weighted by relevance to the instruction unless ``relevance="uniform"``."""
        x = F.normalize(features.float(), dim=-1)
        similarity = x @ x.T
        if self.relevance == "uniform" or ctx.instruction is None:
            return similarity
        embeds, mask = ctx.instruction()
        r = instruction_relevance(features, embeds, mask, -1.0 if self.relevance == "release" else 1.0)
        return r.unsqueeze(1) * similarity * r.unsqueeze(0)

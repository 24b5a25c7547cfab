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
from vtoken.kernels.diversity import cosine_similarities
from vtoken.kernels.dpp import dpp_greedy_map
from vtoken.methods.base import ImageContext, Reduction, VisualTokenMethod
from vtoken.registry import register_method

RELEVANCE = ("release", "similar", "uniform")


def instruction_direction(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(D,) fp32 the mean of the unit vectors of the instruction tokens ``mask`` (L,) of ``embeds`` (L, D): the mean
    cosine of a unit vector with the instruction's tokens is its dot product with this."""
    text = F.normalize(embeds.float(), dim=-1) * mask.unsqueeze(1)
    return text.sum(0) / mask.sum().clamp_min(1)


def instruction_relevance(units: torch.Tensor, direction: torch.Tensor, sign: float) -> torch.Tensor:
    """(..., n) fp32 relevance of the unit-normalised tokens ``units`` (..., n, D) to an instruction whose
    :func:`instruction_direction` is ``direction`` (..., D): ``sign`` x the mean cosine, min-max normalised per image
    as the release does (the denominator gains 1e-6 too, so a constant relevance, e.g. no instruction at all, weighs
    every token alike instead of dividing by zero)."""
    relevance = sign * (units @ direction.unsqueeze(-1)).squeeze(-1)
    low = relevance.amin(dim=-1, keepdim=True)
    return (relevance - low + 1e-6) / (relevance.amax(dim=-1, keepdim=True) - low + 1e-6)


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
                kernels = self.kernels([images[i] for i in members])
                kept = dpp_greedy_map(kernels, k, self.backend).sort(dim=1).values
            for i, indices in zip(members, kept):
                out[i] = Reduction(images[i][0].index_select(0, indices), indices)
        return out

    def kernels(self, images: list[tuple[torch.Tensor, ImageContext]]) -> torch.Tensor:
        """(B, n, n) fp32 for B images of n tokens: cosine similarity, weighted by relevance to the instruction unless
        ``relevance="uniform"``. Items of one prompt row share its instruction, whose direction is computed once."""
        features = torch.stack([tokens for tokens, _ in images])
        similarity = cosine_similarities(features, features)
        contexts = [ctx for _, ctx in images]
        if self.relevance == "uniform" or any(ctx.instruction is None for ctx in contexts):
            return similarity
        instructions = [ctx.instruction() for ctx in contexts]  # held: their ids name the rows below
        directions: dict[int, torch.Tensor] = {}
        for embeds, mask in instructions:
            if id(embeds) not in directions:
                directions[id(embeds)] = instruction_direction(embeds, mask)
        direction = torch.stack([directions[id(embeds)] for embeds, _ in instructions])
        units = F.normalize(features.float(), dim=-1)
        r = instruction_relevance(units, direction, -1.0 if self.relevance == "release" else 1.0)
        return r.unsqueeze(2) * similarity * r.unsqueeze(1)

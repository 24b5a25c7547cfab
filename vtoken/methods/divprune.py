"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse subset of the projected visual tokens.

The subset should maximise the minimum pairwise cosine distance ``1 - cos`` (a max-min diversity problem), which
DivPrune approximates greedily: first the token farthest from its own nearest neighbour, then, repeatedly, the
token farthest from its nearest already-kept token. The loop is ToDRE v1's ``rule="maxmin"`` step; only the first
pick differs (ToDRE starts from the vision encoder's [CLS] favourite) and there is no in-LLM stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtoken.checks import check_choice
from vtoken.kernels.dispatch import BACKENDS
from vtoken.kernels.diversity import cosine_similarities
from vtoken.methods.base import ImageContext, Reduction, VisualTokenMethod
from vtoken.methods.diverse import diverse_reductions
from vtoken.registry import register_method


def most_isolated(x: torch.Tensor, chunk: int = 1024, gram: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) index of the token of each image in ``x`` (B, n, D, any scale) whose cosine distance to its nearest
    other token is largest: DivPrune's first pick. Similarities are fp32; a tie goes to the lowest index.

    ``gram``: the images' cosine similarities (B, n, n), when the selection computed them already. Otherwise rows
    are processed ``chunk`` at a time, so memory stays at B * chunk * n similarities however long the image.
    """
    B, n, _ = x.shape
    if gram is not None:
        itself = torch.eye(n, dtype=torch.bool, device=x.device)  # a token is not its own neighbour
        nearest = 1.0 - gram.masked_fill(itself, float("-inf")).amax(dim=-1)
    else:
        nearest = torch.empty(B, n, dtype=torch.float32, device=x.device)
        for start in range(0, n, chunk):
            rows = torch.arange(start, min(n, start + chunk), device=x.device)
            sim = cosine_similarities(x[:, rows], x)  # (B, R, n)
            sim[:, rows - start, rows] = float("-inf")
            nearest[:, rows] = 1.0 - sim.amax(dim=-1)
    return nearest.argmax(dim=1)  # first maximum: the lowest index wins a tie


@register_method("divprune", stages=("boundary",))
@dataclass
class DivPruneConfig(VisualTokenMethod):
    """DivPrune: greedy max-min cosine diversity selection after the projector, from the most isolated token.

    ``backend`` picks the selection kernel as in ToDRE: ``"auto"`` = the persistent Triton kernel on CUDA, the
    matrix-vector loop elsewhere; ``"torch"`` / ``"triton"`` force one (both give the same tokens).
    """

    backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.backend, "backend", BACKENDS)

    def reduce(self, features: torch.Tensor, ctx: ImageContext) -> Reduction:
        return self.reduce_batch([(features, ctx)])[0]

    def reduce_batch(self, images: list[tuple[torch.Tensor, ImageContext]]) -> list[Reduction]:
        def pivots(x: torch.Tensor, gram: torch.Tensor | None, _members) -> torch.Tensor:
            return most_isolated(x, gram=gram)

        return diverse_reductions(images, self.keep, pivots, "maxmin", self.backend)

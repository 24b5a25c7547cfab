"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247): visual tokens dropped in stages down the LLM.

The decoder is split into stages; at the start of each stage after the first, the last prompt token's attention ranks
the visual tokens still alive, and only the best-ranked go on. The official release (MIT) drops at the input of
(0-based) layers 8, 16 and 24 of LLaVA-1.5-7B's 32, keeping ``floor(N * lambda^s)`` of the image's N tokens after the
s-th drop, with lambda = 0.5: 576 -> 288 -> 144 -> 72. The ranking at a drop layer is that layer's own attention
(its input norm, q and k projections and RoPE on its input), softmax over all keys, averaged over heads, for the
last prompt token as query.

Here ``keep`` is the budget after the last drop (the release's 72 of 576 is 0.125), and
``lambda = (keep / N) ^ (1 / stages)`` sets the stages in between, so the default is the release's schedule exactly.
The layers scale with the decoder's depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vtoken.budget import resolve_budget
from vtoken.checks import check_choice
from vtoken.kernels.dispatch import BACKENDS
from vtoken.methods.base import LayerContext, VisualTokenMethod, scale_layers
from vtoken.methods.baselines import keep_top_count
from vtoken.registry import register_method

RELEASE_DEPTH = 32
RELEASE_LAYERS = (8, 16, 24)  # drops at the input of these (0-based) layers of LLaVA-1.5-7B's 32


def stage_counts(n_visual: int, final: int, stages: tuple[int, ...]) -> list[int]:
    """Visual tokens kept after each drop: ``floor(n * lambda^s)`` for the stage numbers ``stages`` (1-based, the
    last one reaching ``final``), with ``lambda^S = final / n``. A tiny slack keeps exact powers (0.5^3 = 0.125) from
    flooring one below."""
    last = stages[-1]
    counts = [math.floor(n_visual * (final / n_visual) ** (s / last) + 1e-9) for s in stages[:-1]]
    return [max(c, final) for c in counts] + [final]


@register_method("pyramiddrop", stages=("in_llm",))
@dataclass
class PyramidDropConfig(VisualTokenMethod):
    """PyramidDrop: staged drops ranked by the last prompt token's attention.

    ``keep``: the budget after the last drop (int tokens or fraction of each sample's visual tokens; the release's 72
    of 576 is 0.125); each drop keeps ``floor(N * lambda^s)`` with ``lambda^stages = keep / N``. ``layers``: the
    (0-based) layers at whose input tokens are dropped, increasing, within 1 ... L-1; None = the release's 8, 16,
    24 of 32 scaled to the decoder's depth. ``backend`` picks the kernels of the scoring and the compaction
    (``"auto"`` = Triton on CUDA; ``"torch"`` / ``"triton"`` force one; both keep the same tokens).
    """

    keep: int | float = 0.125
    layers: tuple[int, ...] | None = None
    backend: str = "auto"
    prune_at_scored_layer = True

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.backend, "backend", BACKENDS)
        if self.layers is not None:
            layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else self.layers
            if (not isinstance(layers, tuple) or not layers
                    or any(isinstance(x, bool) or not isinstance(x, int) for x in layers)):
                raise ValueError(f"layers must be a non-empty tuple of ints; got {self.layers!r}")
            if layers[0] < 1 or any(b <= a for a, b in zip(layers, layers[1:])):
                raise ValueError(f"layers={layers} must be strictly increasing and start at 1 or later (layer 0 "
                                 "would drop tokens before the LLM has seen them)")
            self.layers = layers

    def schedule(self, num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(drop layers, their 1-based stage numbers) for a decoder of ``num_layers`` layers."""
        if self.layers is None:
            if num_layers < 2:
                raise ValueError("pyramiddrop needs a decoder of at least 2 layers (it drops between layers)")
            layers = scale_layers(RELEASE_LAYERS, RELEASE_DEPTH, num_layers)
            return tuple(layers), tuple(layers.values())
        if self.layers[-1] > num_layers - 1:
            raise ValueError(f"layers={self.layers} is out of range for a {num_layers}-layer decoder; allowed: "
                             f"1 ... {num_layers - 1}")
        return self.layers, tuple(range(1, len(self.layers) + 1))

    def score_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.schedule(num_layers)[0]

    def prune(self, ctx: LayerContext) -> torch.Tensor:
        layers, stages = self.schedule(ctx.num_layers)
        stage = layers.index(ctx.layer)
        counts = [stage_counts(n, resolve_budget(self.keep, n), stages)[stage] if n else 0
                  for n in ctx.n_visual_input]
        last = ctx.last_index().unsqueeze(1)  # (B, 1): the last prompt token is the query
        attn = ctx.received(last, torch.ones_like(last, dtype=torch.float32))  # (B, L), head-averaged
        ctx.record.update(kept=counts)
        ctx.kept = counts
        return keep_top_count(attn, ctx.visual, counts)

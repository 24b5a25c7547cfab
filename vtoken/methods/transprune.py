"""TransPrune (Li et al., arXiv 2507.20630, CVPR 2026): progressive in-LLM pruning by token transition.

Each visual token gets two scores, each sum-normalised over the sample's visual tokens and then added:

* **Token Transition Variation** (TTV): how strongly a sub-layer rewrites the token. For the attention block and the
  MLP of a layer, with x the sub-layer's (normalised) input and y its output before the residual add,
  ``TTV = ||y|| / ||x|| * softmax(1 - cos(x, y))``, the softmax taken over every real token of the sample (text
  included). A layer's TTV is the sum of both sub-layers'; it is accumulated over the layers from the first to the
  last pruning layer, up to the layer being pruned.
* **Instruction-Guided Attention** (IGA): the head-averaged attention the instruction tokens (every real token after
  the image) pay each visual token, from the projections of the layer that the pruned tokens would enter next,
  averaged over the instruction tokens (``LayerContext.received``, so the model keeps SDPA / FlashAttention).

After each pruning layer the lowest-scoring visual tokens go; the kept ones keep their order and original positions.
The default schedule is the official release's: after (1-based) layers 7, 9 and 12 of 32, keep 504, 360 and 72 of
576 visual tokens. ``keep`` is the final budget; the stages in between remove the same shares of what is removed
in all (1/7, 3/7, all), and the layers scale with the decoder's depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtoken.budget import resolve_budget, round_half_up
from vtoken.checks import check_choice
from vtoken.kernels.dispatch import BACKENDS
from vtoken.methods.base import LayerContext, SublayerContext, VisualTokenMethod, scale_layers
from vtoken.methods.baselines import keep_top_count
from vtoken.registry import register_method

RELEASE_DEPTH = 32
RELEASE_LAYERS = (7, 9, 12)  # prune after these (1-based) layers of LLaVA-1.5-7B's 32
RELEASE_SHARES = (1 / 7, 3 / 7, 1.0)  # 576 -> 504 -> 360 -> 72: 72, 216 and all 504 of the removed tokens gone
DIRECTIONS = ("release", "paper")
EPS = 1e-8



def token_transition_variation(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, direction: str) -> torch.Tensor:
    """(B, L) TTV of one sub-layer with input ``x`` and output ``y`` (B, L, D): the norm ratio ``||y|| / ||x||``
    times the softmax, over each sample's ``valid`` tokens (0 elsewhere), of the direction change ``1 - cos(x, y)``
    (``direction="release"``) or ``1 - |cos(x, y)|`` (``"paper"``). In fp32; each norm is computed once."""
    x, y = x.float(), y.float()
    norm_x, norm_y = x.norm(dim=-1), y.norm(dim=-1)
    ratio = norm_y / norm_x.clamp_min(EPS)
    cos = (x * y).sum(dim=-1) / (norm_x * norm_y).clamp_min(EPS)
    change = (1 - (cos.abs() if direction == "paper" else cos)).masked_fill(~valid, float("-inf"))
    weight = torch.softmax(change, dim=-1).nan_to_num(0.0)  # a sample without valid tokens gets zeros
    return torch.where(valid, ratio * weight, 0.0)


def sum_normalised(scores: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """(B, L) ``scores`` divided by their sum over each sample's ``members`` (+1e-8, as the release), 0 elsewhere."""
    scores = scores.float() * members
    return scores / (scores.sum(dim=-1, keepdim=True) + EPS)


def instruction_queries(ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The :func:`~vtoken.methods.base.instruction_rows` as ``LayerContext.received`` takes them: (B, R) row
    indices and (B, R) weights averaging over each sample's rows. They are the tokens after the last visual one
    (padding is on the left), so a contiguous run from there to the end: ``R`` bounds them on the host
    (``text_width``) and nothing is sorted."""
    L = ctx.valid.shape[1]
    start = (ctx.visual * torch.arange(1, L + 1, device=ctx.valid.device)).amax(dim=1, keepdim=True)  # (B, 1)
    rows = start + torch.arange(min(L, ctx.text_width()), device=start.device)
    inside = rows < L
    weights = inside / (L - start).clamp(min=1)
    return rows.clamp(max=L - 1), weights


def release_schedule(num_layers: int, shares: tuple[float, ...] = RELEASE_SHARES) -> tuple[tuple[int, ...], tuple]:
    """The release's pruning layers scaled to ``num_layers`` (:func:`~vtoken.methods.base.scale_layers`); stages
    that land on the same layer merge into one that goes as far as the later of them."""
    moved = scale_layers(RELEASE_LAYERS, RELEASE_DEPTH, num_layers)
    return tuple(moved), tuple(shares[number - 1] for number in moved.values())


def stage_count(n_visual: int, final: int, share: float) -> int:
    """Visual tokens kept after a stage that has removed ``share`` of the ``n_visual - final`` removed in all."""
    return final + round_half_up((n_visual - final) * (1.0 - share))


def check_increasing(values, arg: str, kind: type) -> tuple:
    values = tuple(values) if isinstance(values, (list, tuple)) else values
    if not isinstance(values, tuple) or not values or any(
            isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int) for v in values):
        raise ValueError(f"{arg} must be a non-empty tuple of {kind.__name__}s; got {values!r}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{arg}={values} must be strictly increasing")
    return values


@register_method("transprune", stages=("in_llm",))
@dataclass
class TransPruneConfig(VisualTokenMethod):
    """TransPrune: progressive in-LLM pruning by token transition variation + instruction-guided attention.

    ``keep``: the final budget (int tokens or fraction of each sample's visual tokens; the release's 72 of 576 is
    0.125). ``layers``: the (1-based) layers after which tokens are pruned; None = the release's 7, 9, 12 of 32,
    scaled to the decoder's depth. ``shares``: for each pruning layer, the share of the removed tokens gone after
    it, increasing to 1.0; None = the release's (1/7, 3/7, 1.0) with the default layers, even steps otherwise.
    ``direction``: ``"release"`` = ``1 - cos`` (the released code, which produced the paper's tables), ``"paper"`` =
    ``1 - |cos|`` (the paper's formula). ``iga=False`` ranks by TTV alone. ``backend`` picks the kernels of the IGA
    scoring and the compaction (``"auto"`` = Triton on CUDA; ``"torch"`` / ``"triton"`` force one).
    """

    keep: int | float = 0.125
    layers: tuple[int, ...] | None = None
    shares: tuple[float, ...] | None = None
    direction: str = "release"
    iga: bool = True
    backend: str = "auto"
    prune_at_scored_layer = True

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.direction, "direction", DIRECTIONS)
        check_choice(self.iga, "iga", (True, False))
        check_choice(self.backend, "backend", BACKENDS)
        if self.layers is not None:
            self.layers = check_increasing(self.layers, "layers", int)
            if self.layers[0] < 1:
                raise ValueError(f"layers={self.layers}: a layer prunes after itself, so the first must be >= 1")
        if self.shares is not None:
            self.shares = tuple(float(s) for s in check_increasing(self.shares, "shares", float))
            if self.shares[0] <= 0 or self.shares[-1] != 1.0:
                raise ValueError(f"shares={self.shares} must lie in (0, 1] and end at 1.0 (the last stage reaches "
                                 "the final budget, keep)")
            expected = len(RELEASE_LAYERS) if self.layers is None else len(self.layers)
            if len(self.shares) != expected:
                raise ValueError(f"shares={self.shares} needs one entry per pruning layer ({expected}: "
                                 f"{self.layers or RELEASE_LAYERS})")

    def schedule(self, num_layers: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(pruning layers, shares) for a decoder of ``num_layers`` layers."""
        if self.layers is None:
            if num_layers < 2:
                raise ValueError("transprune needs a decoder of at least 2 layers (it prunes between layers)")
            return release_schedule(num_layers, self.shares or RELEASE_SHARES)
        if self.layers[-1] > num_layers - 1:
            raise ValueError(f"layers={self.layers} is out of range for a {num_layers}-layer decoder; allowed: "
                             f"1 ... {num_layers - 1} (the last layer must have a layer after it)")
        n = len(self.layers)
        return self.layers, self.shares or tuple((i + 1) / n for i in range(n))

    # The release prunes the output of (1-based) layer p, i.e. the input of 0-based layer p, before it runs.
    def score_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.schedule(num_layers)[0]

    def observed_sublayers(self, num_layers: int) -> dict[str, tuple[int, ...]]:
        layers = self.schedule(num_layers)[0]
        accumulate = tuple(range(layers[0] - 1, layers[-1]))  # 1-based first ... last pruning layer
        return {"attention": accumulate, "mlp": accumulate}

    def observe(self, ctx: SublayerContext) -> None:
        # kept until the next prune, which reads them all at once (every call between two prunes sees the same
        # tokens, so their TTVs are one batched computation: a few ops per stage instead of per sub-layer)
        ctx.state.setdefault("pending", []).append(ctx)
        ctx.state.setdefault("n_positions", ctx.n_positions)

    def accumulate(self, state: dict) -> None:
        """Add the TTVs of the sub-layers seen since the last prune to each LLM-input position's total."""
        pending = state.pop("pending", [])
        if not pending:
            return
        first = pending[0]
        ttv = token_transition_variation(torch.cat([c.input for c in pending]), torch.cat([c.output for c in pending]),
                                         first.valid.repeat(len(pending), 1), self.direction)
        ttv = ttv.view(len(pending), *first.valid.shape).sum(0)
        total = state.get("ttv")
        if total is None:
            total = state["ttv"] = torch.zeros(ttv.shape[0], state["n_positions"], device=ttv.device)
        total.scatter_add_(1, first.positions, ttv)  # by LLM-input position: stays aligned as tokens are pruned

    def prune(self, ctx: LayerContext) -> torch.Tensor:
        layers, shares = self.schedule(ctx.num_layers)
        share = shares[layers.index(ctx.layer)]
        counts = [stage_count(n, resolve_budget(self.keep, n), share) for n in ctx.n_visual_input]
        self.accumulate(ctx.state)
        ttv = ctx.state["ttv"].gather(1, ctx.positions)
        if self.iga:  # both terms normalised in one go: (2, B, L), then added
            score = sum_normalised(torch.stack([ttv, ctx.received(*instruction_queries(ctx))]), ctx.visual).sum(0)
        else:
            score = sum_normalised(ttv, ctx.visual)
        ctx.record.update(kept=counts)
        ctx.kept = counts
        return keep_top_count(score, ctx.visual, counts)

"""ToDRE (Li et al., arXiv 2505.18757): diversity-driven selection + task-relevance removal.

Stage 1 (boundary, query-agnostic): pick a pivot with the vision encoder's [CLS] attention, then greedily
keep the tokens that are least similar (cosine, post-projector space) to those already kept.
``rule="maxsum"`` is the paper's v2 algorithm (argmin of the *summed* similarity to the kept set);
``rule="maxmin"`` is the classical greedy k-center / farthest-point rule that v1 names.

Stage 2 (in the decoder, prefill): at layer ``stage2_layer`` (default ``7L // 8``, 0-based) measure two
head-averaged cross-modal attention ratios; if both are below ``tau`` the visual tokens are dropped from every
later layer. Text set T: every real non-visual token except the first one (BOS / attention sink, which plays
the paper's "system" role). With LLaVA's order (prompt, image, question) the visual->text ratio then only sees
the pre-image prompt tokens; the paper's Eq. 8 read literally would make it identically zero under causal
attention. ``handle.stats`` records how often the rule fires.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtoken.checks import check_choice, check_float, check_int
from vtoken.kernels.dispatch import BACKENDS
from vtoken.kernels.diversity import RULES
from vtoken.methods.base import ImageContext, LayerContext, Reduction, VisualTokenMethod
from vtoken.methods.diverse import diverse_reductions
from vtoken.registry import register_method


def cross_modal_ratios(ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_text_to_visual, alpha_visual_to_text), each (B,), from head-averaged attention of this layer.

    alpha_t->v: mean over text query rows of the attention mass on visual keys (rows sum to one).
    alpha_v->t: mean over visual query rows of the mass on text keys.
    """
    B = ctx.valid.shape[0]
    first = ctx.valid.float().argmax(dim=1)  # first real token: BOS / attention sink, not "text"
    text = ctx.text.clone()
    text[torch.arange(B), first] = False
    t2v = (ctx.received(*mean_over(text)) * ctx.visual).sum(-1)
    v2t = (ctx.received(*mean_over(ctx.visual)) * text).sum(-1)
    return t2v, v2t


def mean_over(rows: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The query rows of a (B, L) set and weights averaging over each sample's rows: the arguments of
    ``LayerContext.received`` for a mean over that set. ``width`` (known on the host, at least the largest sample's
    row count): the rows left-aligned to that many (fewer rows to score); None: every column, with weight 0 outside
    the set (fewer ops, nothing sorted)."""
    counts = rows.sum(1, keepdim=True).clamp(min=1)
    if width is None or width >= rows.shape[1]:
        index = torch.arange(rows.shape[1], device=rows.device).expand(rows.shape[0], -1)
        return index, rows / counts
    pos = torch.arange(rows.shape[1], device=rows.device)
    index = torch.where(rows, pos, rows.shape[1]).sort(dim=1).values[:, :width]
    real = index < rows.shape[1]
    return torch.where(real, index, 0), real / counts


@register_method("todre", stages=("boundary", "in_llm"))
@dataclass
class ToDREConfig(VisualTokenMethod):
    """ToDRE: [CLS]-pivoted greedy diversity selection after the projector + late task-relevance removal.

    ``backend`` picks the kernels: stage-1 selection (``"auto"`` = the persistent Triton kernel on CUDA, the
    matrix-vector loop elsewhere), stage-2 attention scoring and compaction (Triton on CUDA, PyTorch elsewhere);
    ``"torch"`` / ``"triton"`` force one (both give the same tokens).
    """

    keep: int | float = 0.25
    rule: str = "maxsum"
    pivot: str = "cls"
    stage2: bool = True
    stage2_layer: int | None = None
    tau: float = 0.10
    seed: int = 0
    backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.rule, "rule", RULES)
        check_choice(self.pivot, "pivot", ("cls", "random"))
        check_choice(self.stage2, "stage2", (True, False))
        if self.stage2_layer is not None:
            check_int(self.stage2_layer, "stage2_layer", 0)
        self.tau = check_float(self.tau, "tau", 0.0, 1.0)
        check_int(self.seed, "seed", 0)
        check_choice(self.backend, "backend", BACKENDS)

    # stage 1 -------------------------------------------------------------------------------------------------
    def choose_pivot(self, ctx: ImageContext) -> torch.Tensor:
        # Encoders without [CLS] (or pivot="random"): a seeded random pivot, which the paper's ablation shows
        # costs at most 0.2 points (drawn once per token count).
        fallbacks = self.__dict__.setdefault("_random_pivots", {})
        if ctx.n not in fallbacks:
            fallbacks[ctx.n] = int(torch.randint(ctx.n, (), generator=torch.Generator().manual_seed(self.seed)))
        fallback = fallbacks[ctx.n]
        scores = ctx.pivot_scores() if self.pivot == "cls" else None
        if scores is None:
            return torch.tensor(fallback)
        # no score at all (a view without [CLS] attention): the same random pivot, chosen on the device
        return torch.where(torch.isfinite(scores).any(), scores.argmax(), fallback)

    def reduce(self, features: torch.Tensor, ctx: ImageContext) -> Reduction:
        return self.reduce_batch([(features, ctx)])[0]

    def reduce_batch(self, images: list[tuple[torch.Tensor, ImageContext]]) -> list[Reduction]:
        def pivots(x: torch.Tensor, _gram, members: list[int]) -> torch.Tensor:
            return torch.stack([self.choose_pivot(images[i][1]).to(x.device) for i in members])

        return diverse_reductions(images, self.keep, pivots, self.rule, self.backend)

    # stage 2 -------------------------------------------------------------------------------------------------
    def check_layer(self, num_layers: int) -> int:
        if self.stage2_layer is None:  # 7L/8, but never the last layer: a removal must leave a layer to act on
            return max(0, min((7 * num_layers) // 8, num_layers - 2))
        return check_int(self.stage2_layer, "stage2_layer", 0, num_layers - 2)

    def score_layers(self, num_layers: int) -> tuple[int, ...]:
        return (self.check_layer(num_layers),) if self.stage2 else ()

    def prune(self, ctx: LayerContext) -> torch.Tensor:
        t2v, v2t = cross_modal_ratios(ctx)
        drop = (t2v < self.tau) & (v2t < self.tau)
        ctx.record.update(text_to_visual=t2v, visual_to_text=v2t, removed=drop)  # read when a user looks
        return ~(ctx.visual & drop.unsqueeze(1))

"""CoreMatching (Wang et al., ICML 2025, arXiv 2505.19235): core neurons select core tokens, and decode runs only
the core neurons.

From the SwiGLU activation ``a(x) = act(gate(x)) * up(x)`` of a decoder layer (the input of its down projection):

* **token-wise core neurons** ``C_rho(x)``: the top ``rho`` fraction of the token's positive activations
  (``ceil(rho * #positive)`` neurons, so any token with a positive activation has one);
* **sentence-wise core neurons** ``C(s)``: the ``int(beta * m)`` neurons (at least one) that are token-wise core
  neurons of the most tokens of the prompt (every real token, text and visual; ties: lower index first);
* **core-token score**: ``|Gamma(x) ∩ C(s)|``, the activated neurons (``a > 0``) of a visual token among the core
  neurons;
* **core tokens**: score at least the threshold of the maximum-distance rule on the sorted scores (``elbow_threshold``),
  or, with ``keep``, the ``keep`` best-scoring visual tokens.

The core tokens are chosen from the FFN activations of (1-based) layer ``layer``; every later layer sees only them
(the tokens go before the next layer runs). In every layer of ``ffn_layers`` the prefill's core neurons are kept per
row, and each later single-token step's FFN computes only those (weights sliced once after prefill).

``variant="release"`` reproduces the authors' released code instead, for comparison: it removes nothing and skips no
neuron; in (0-based) layers 5 ... 18 of the prefill it scores the visual tokens by how many activated neurons they
share with the fifth-last prompt token, picks them with the same rule (strict ``>``) per layer, and sets the keys and
values of the others to zero in that layer's cache. The first generated token is therefore always the dense model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from vtoken.budget import check_budget, round_half_up
from vtoken.checks import check_choice, check_float, check_int
from vtoken.kernels.dispatch import BACKENDS
from vtoken.methods.base import LayerContext, PrefillOutcome, SublayerContext, VisualTokenMethod
from vtoken.methods.baselines import keep_top_visual
from vtoken.registry import register_method

VARIANTS = ("paper", "release")
CORE_INFER_LAYERS = (6, 27)  # CoreInfer converts (0-based) layers 6 ... 26 of a 32-layer LLaMA
RELEASE_LAYERS = (5, 19)  # the release scores (0-based) layers 5 ... 18 ("5 < len(cache) < 20")
REFERENCE_FROM_END = 5  # the release's reference row: prompt position N - 5
REFERENCE_DEPTH = 32
BATCHED_LAYERS = 4  # converted layers whose activations are held to compute their decode neurons together



def token_core_neurons(activation: torch.Tensor, rho: float) -> torch.Tensor:
    """(..., m) bool: each token's core neurons, the top ``ceil(rho * #positive)`` of its positive activations
    (ties at the threshold all count)."""
    positive = activation > 0
    counts = torch.ceil(positive.sum(-1, keepdim=True) * rho)  # (..., 1)
    top = math.ceil(rho * activation.shape[-1])  # no token has more core neurons: sized on the host, no read
    if top == 0 or activation.numel() == 0:
        return torch.zeros_like(positive)
    values = activation.topk(top, dim=-1).values  # descending
    threshold = values.gather(-1, counts.long().sub_(1).clamp_(min=0))  # the counts-th largest (any, if none)
    return (activation >= threshold) & positive


def sentence_core_neurons(token_core: torch.Tensor, valid: torch.Tensor, beta: float) -> torch.Tensor:
    """(B, k) sorted indices of the ``k = max(1, int(beta * m))`` neurons that are token-wise core neurons
    (``token_core``, (B, L, m)) of the most ``valid`` tokens; ties go to the lower index."""
    m = token_core.shape[-1]
    k = max(1, int(beta * m))
    frequency = (token_core & valid.unsqueeze(-1)).sum(dim=1)  # (B, m)
    order = frequency.argsort(dim=-1, descending=True, stable=True)
    return order[:, :k].sort(dim=-1).values


def core_token_scores(activation: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """(B, L): how many of each token's activated neurons (``activation > 0``, (B, L, m)) are in ``core`` (B, k)."""
    in_core = torch.zeros(activation.shape[0], activation.shape[-1], dtype=torch.bool, device=activation.device)
    in_core.scatter_(1, core, True)
    return ((activation > 0) & in_core.unsqueeze(1)).sum(dim=-1)


def elbow_threshold(scores: torch.Tensor) -> torch.Tensor:
    """The maximum-distance threshold of 1-D ``scores``: sort them in descending order, draw the chord from the first
    point ``(0, y_0)`` to the last ``(n-1, y_{n-1})``, and return the score of the point farthest from it.

    The distances are compared without normalising either axis, as ``|(n-1)(y_0 - y_i) + i (y_{n-1} - y_0)|`` (the
    cross product, proportional to the distance): exact in integer arithmetic for integer scores (float64 otherwise).
    Normalised axes give the same point in exact arithmetic, but in floating point they break an exact tie between
    two points either way. A tie goes to the first point in descending order: the higher threshold, fewer tokens."""
    y = scores.sort(descending=True).values
    y = y.double() if y.is_floating_point() else y.long()
    n = y.numel()
    index = torch.arange(n, dtype=y.dtype, device=y.device)
    distance = ((n - 1) * (y[0] - y) + index * (y[-1] - y[0])).abs()
    return y[distance.argmax()]  # argmax returns the first maximum


def elbow_keep(scores: torch.Tensor, visual: torch.Tensor, strict: bool = False) -> torch.Tensor:
    """(B, L) every non-visual token plus, per sample, the visual tokens whose score reaches the sample's elbow
    threshold (``>=``, the paper; ``strict``: ``>``, the release). All samples at once, on the device: each sample's
    visual scores sorted in descending order, :func:`elbow_threshold`'s rule over the first ``n`` of them."""
    exact = not scores.is_floating_point()
    values = scores.long() if exact else scores.double()
    low = torch.iinfo(torch.long).min if exact else float("-inf")
    y = torch.where(visual, values, low).sort(dim=1, descending=True).values  # (B, L), visual scores first
    n = visual.sum(1, keepdim=True)  # (B, 1)
    first, last = y[:, :1], y.gather(1, (n - 1).clamp(min=0))
    index = torch.arange(y.shape[1], device=y.device, dtype=y.dtype).unsqueeze(0)
    distance = ((n - 1).to(y.dtype) * (first - y) + index * (last - first)).abs()
    distance = torch.where(index < n, distance, -1)  # only a sample's own points compete
    tau = y.gather(1, distance.argmax(dim=1, keepdim=True))  # argmax returns the first maximum
    above = values > tau if strict else values >= tau
    return ~visual | (visual & above)


def scaled_range(span: tuple[int, int], num_layers: int) -> range:
    """A (start, stop) range of 0-based layers of a 32-layer model, scaled to ``num_layers`` (at least one layer)."""
    start = min(round_half_up(span[0] * num_layers / REFERENCE_DEPTH), num_layers - 1)
    stop = max(round_half_up(span[1] * num_layers / REFERENCE_DEPTH), start + 1)
    return range(start, min(stop, num_layers))


def parse_ffn_layers(spec) -> tuple[int, ...] | str:
    """Validate ``ffn_layers``: "default", "all", "none" / None, "a-b" (0-based, inclusive) or a tuple of ints."""
    if spec is None or spec in ("default", "all", "none"):
        return "none" if spec is None else spec
    if isinstance(spec, str):
        start, sep, stop = spec.partition("-")
        if sep and start.strip().isdigit() and stop.strip().isdigit() and int(start) <= int(stop):
            return tuple(range(int(start), int(stop) + 1))
    elif isinstance(spec, (tuple, list)) and spec and all(isinstance(i, int) and not isinstance(i, bool)
                                                          for i in spec):
        if len(set(spec)) == len(spec) and min(spec) >= 0:
            return tuple(sorted(spec))
    raise ValueError(f"ffn_layers={spec!r} is not allowed; use 'default' (CoreInfer's layers 6-26 of 32, scaled to "
                     "the depth), 'all', 'none' (or None: no decode sparsity), 'a-b' (0-based layers a to b) or a "
                     "tuple of distinct 0-based layer indices")


@register_method("corematching", stages=("in_llm",))
@dataclass
class CoreMatchingConfig(VisualTokenMethod):
    """CoreMatching: FFN core neurons pick the core tokens (adaptive threshold); decode runs only the core neurons.

    ``keep``: None = the adaptive maximum-distance threshold per sample; an int or fraction keeps that many
    best-scoring visual tokens instead. ``rho``: share of a token's positive activations that are its core neurons.
    ``beta``: share of the FFN's neurons that are the prompt's core neurons (1.0: every neuron, decode stays dense).
    ``layer``: the FFN activations of this (1-based) layer choose the core tokens; later layers see only them.
    ``ffn_layers``: the (0-based) layers whose decode FFN runs only the core neurons: "default" = CoreInfer's layers
    6-26 of 32 scaled to the depth, "all", "none" / None, "a-b", or a tuple. ``variant="release"`` reproduces the
    official code's KV zeroing (no removal, no neuron sparsity) and takes none of the other arguments. ``backend``
    picks the compaction kernel (``"auto"`` = Triton on CUDA).
    """

    keep: int | float | None = None
    rho: float = 0.2
    beta: float = 0.4
    layer: int = 2
    ffn_layers: tuple[int, ...] | str | None = "default"
    variant: str = "paper"
    backend: str = "auto"
    prune_at_scored_layer = True

    def __post_init__(self):
        if self.keep is not None:
            self.keep = check_budget(self.keep)
        self.rho = check_float(self.rho, "rho", 0.0, 1.0, low_open=True)
        self.beta = check_float(self.beta, "beta", 0.0, 1.0, low_open=True)
        check_int(self.layer, "layer", 1)
        self.ffn_layers = parse_ffn_layers(self.ffn_layers)
        check_choice(self.variant, "variant", VARIANTS)
        check_choice(self.backend, "backend", BACKENDS)
        if self.variant == "release":
            defaults = {f.name: f.default for f in fields(self) if f.name not in ("variant", "backend")}
            defaults["ffn_layers"] = "default"
            changed = [name for name, value in defaults.items() if getattr(self, name) != value]
            if changed:
                raise ValueError(f"variant='release' reproduces the released code, which has no {', '.join(changed)}; "
                                 "leave them at their defaults (keep=None) or use variant='paper'")

    # -- layers ------------------------------------------------------------------------------------------------
    def selection_layer(self, num_layers: int) -> int:
        """0-based index of the first layer that runs on the core tokens only."""
        return check_int(self.layer, "layer", 1, num_layers - 1)

    def converted(self, num_layers: int) -> tuple[int, ...]:
        """0-based layers whose decode FFN runs the core neurons."""
        spec = self.ffn_layers
        if spec == "none" or self.beta == 1.0 or self.variant == "release":
            return ()
        if spec == "default":
            return tuple(scaled_range(CORE_INFER_LAYERS, num_layers))
        if spec == "all":
            return tuple(range(num_layers))
        if spec[-1] >= num_layers:
            raise ValueError(f"ffn_layers={spec} is out of range for a {num_layers}-layer decoder; allowed: 0 ... "
                             f"{num_layers - 1}")
        return spec

    def release_layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers the release scores: 5 ... 18 when the decoder has them, else that span scaled to its depth."""
        if num_layers >= RELEASE_LAYERS[1]:
            return tuple(range(*RELEASE_LAYERS))
        return tuple(scaled_range(RELEASE_LAYERS, num_layers))

    def score_layers(self, num_layers: int) -> tuple[int, ...]:
        return () if self.variant == "release" else (self.selection_layer(num_layers),)

    def observed_sublayers(self, num_layers: int) -> dict[str, tuple[int, ...]]:
        if self.variant == "release":
            return {"mlp_hidden": self.release_layers(num_layers)}
        layers = {self.selection_layer(num_layers) - 1, *self.converted(num_layers)}
        return {"mlp_hidden": tuple(sorted(layers))}

    def decode_ffn_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.converted(num_layers)

    # -- prefill -----------------------------------------------------------------------------------------------
    def observe(self, ctx: SublayerContext) -> None:
        if self.variant == "release":
            self.observe_release(ctx)
            return
        if "has_visual" not in ctx.state:  # the first observed layer comes before any pruning
            ctx.state["has_visual"] = ctx.visual.any(1)
        converted = ctx.layer in self.converted(ctx.num_layers)
        if ctx.layer == self.layer - 1:  # the selection needs its core neurons now
            core = sentence_core_neurons(token_core_neurons(ctx.input, self.rho), ctx.valid, self.beta)
            if converted:
                ctx.state.setdefault("neurons", {})[ctx.layer] = core
            scores = torch.where(ctx.valid, core_token_scores(ctx.input, core), 0)
            ctx.state["scores"] = torch.zeros(scores.shape[0], ctx.n_positions, dtype=scores.dtype,
                                              device=scores.device).scatter_(1, ctx.positions, scores)
        elif converted:  # decode neurons: a few layers at a time, as one batched computation
            pending = ctx.state.get("pending")
            if pending and pending[0].positions is not ctx.positions:  # other tokens since: another batch
                self.flush(ctx.state)
            pending = ctx.state.setdefault("pending", [])
            pending.append(ctx)
            if len(pending) == BATCHED_LAYERS:
                self.flush(ctx.state)

    def flush(self, state: dict) -> None:
        """The decode neurons of the converted layers seen since the last flush, computed together."""
        pending = state.pop("pending", [])
        if not pending:
            return
        activation = torch.cat([c.input for c in pending]) if len(pending) > 1 else pending[0].input
        valid = pending[0].valid.repeat(len(pending), 1)
        core = sentence_core_neurons(token_core_neurons(activation, self.rho), valid, self.beta)
        neurons = state.setdefault("neurons", {})
        for c, part in zip(pending, core.view(len(pending), -1, core.shape[-1]).unbind(0)):
            neurons[c.layer] = part

    def prune(self, ctx: LayerContext) -> torch.Tensor:
        scores = ctx.state["scores"].gather(1, ctx.positions)
        keep = elbow_keep(scores, ctx.visual) if self.keep is None else keep_top_visual(scores, ctx, self.keep)
        ctx.record.update(kept=(keep & ctx.visual).sum(1))  # read when a user looks
        return keep

    def after_prefill(self, state: dict) -> PrefillOutcome | None:
        if self.variant == "release":
            return PrefillOutcome(zero_kv=state.get("zero", {}))
        self.flush(state)
        neurons = state.get("neurons")
        if not neurons:
            return None
        neurons = dict(sorted(neurons.items()))
        # a prompt without images decodes dense, as it does alone: its rows become -1 (one op for every layer)
        stacked = torch.where(state["has_visual"][:, None, None], torch.stack(list(neurons.values()), dim=1), -1)
        return PrefillOutcome(decode_neurons=dict(zip(neurons, stacked.unbind(1))))

    # -- the released code -----------------------------------------------------------------------------------------
    def observe_release(self, ctx: SublayerContext) -> None:
        """Score the visual tokens by activated neurons shared with the fifth-last prompt token; zero the K/V of
        those under the (strict) threshold in this layer."""
        active = ctx.input > 0  # (B, L, m)
        pos = torch.arange(active.shape[1], device=active.device)
        first = torch.where(ctx.valid, pos, active.shape[1]).amin(dim=1)
        last = torch.where(ctx.valid, pos, -1).amax(dim=1)
        reference = torch.maximum(last - (REFERENCE_FROM_END - 1), first)
        ref_active = active[torch.arange(active.shape[0]), reference]  # (B, m)
        shared = (active & ref_active.unsqueeze(1)).sum(dim=-1)  # (B, L)
        dropped = ctx.visual & ~elbow_keep(shared, ctx.visual, strict=True)
        zero = torch.zeros(dropped.shape[0], ctx.n_positions, dtype=torch.bool, device=dropped.device)
        ctx.state.setdefault("zero", {})[ctx.layer] = zero.scatter_(1, ctx.positions, dropped)

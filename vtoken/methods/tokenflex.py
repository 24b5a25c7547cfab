"""TokenFLEX (Hu et al., 2025, arXiv:2504.03154): one VLM that works at any visual-token count N.

Two parts (no official code is public; the projector follows the authors' related released model, Ristretto-3B,
as docs/tokenflex.md records):

* the **token-adaptive projector** (:class:`TokenFlexProjector`): each view's patch grid is resized bilinearly to a
  multiple of ``n = sqrt(N)``, average-pooled to ``n x n``, then LayerNorm -> SwiGLU MLP (hidden ``3 x`` the vision
  width) -> the LLM width. No weight depends on N, so one projector serves every N;
* **stochastic token counts** in training: one N per step, drawn from a distribution biased towards large N
  (``vtoken.training``).

``projector=None`` is the training-free form of the same idea: the host's own projector on the pooled grid.
This module is pure tensor code; ``vtoken.adapters.bridges.llava_tokenflex`` puts it into LLaVA / LLaVA-NeXT.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vtoken.checks import check_int
from vtoken.registry import register_method

# The paper's counts and their 2:3:5 sampling weights, for SigLIP-so400m/14 at 384 px: a 27 x 27 patch grid.
PAPER_COUNTS = {64: 0.2, 144: 0.3, 256: 0.5}
PAPER_GRID_SIDE = 27
PROJECTOR_FORMAT = "vtoken-tokenflex-projector"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "projector.pt"


def grid_side(num_tokens, arg: str = "num_tokens") -> int:
    """``sqrt(num_tokens)`` for a perfect square >= 1: the pooled grid is ``n x n``, so no other count exists."""
    check_int(num_tokens, arg, 1)
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        below, above = side * side, (side + 1) ** 2
        raise ValueError(f"{arg}={num_tokens} is not a perfect square: the pooled grid is n x n, so use n*n tokens "
                         f"(e.g. {below} or {above})")
    return side


def check_num_tokens(num_tokens, arg: str = "num_tokens") -> int | float:
    """A request that needs no model to judge: a perfect-square int, or a float share in (0, 1]."""
    if isinstance(num_tokens, float):
        if not 0.0 < num_tokens <= 1.0:  # also refuses NaN
            raise ValueError(f"{arg}={num_tokens} is out of range: a float is the share of the native tokens per "
                             "view, in (0, 1]")
        return num_tokens
    grid_side(num_tokens, arg)
    return num_tokens


def resolve_num_tokens(num_tokens: int | float, native: int, arg: str = "num_tokens") -> int:
    """Visual tokens per view for a request against a native ``native`` (a square) patch grid.

    An int is the count itself (a perfect square, at most ``native``); a float in (0, 1] is a share of the native
    grid, rounded down to the nearest square grid (at least 1 x 1), like every other method's fraction budget.
    """
    check_num_tokens(num_tokens, arg)
    if isinstance(num_tokens, float):
        return max(1, math.isqrt(int(num_tokens * native + 1e-9))) ** 2
    if num_tokens > native:
        side = math.isqrt(native)
        raise ValueError(f"{arg}={num_tokens} is larger than the {native} patch tokens ({side}x{side}) per view of "
                         f"this model; use a square count <= {native} (pooling never upsamples)")
    return num_tokens


def pool_grid(features: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, L, C) square patch grids, row-major -> (B, N, C): TAP's pooling (spec section 2, steps 1-4).

    The grid is resized bilinearly (``align_corners=True``) to the next multiple of ``n = sqrt(N)``, then
    average-pooled with a ``k x k`` kernel and stride, so every output token averages the same number of cells
    (``adaptive_avg_pool2d`` is close but not identical when n does not divide the side). At the native count the
    input comes back unchanged. Computed in float32 and returned in the input's dtype.
    """
    B, L, C = features.shape
    side = math.isqrt(L)
    if side * side != L:
        raise ValueError(f"TokenFLEX pools a square patch grid; got {L} tokens per view (drop any [CLS] token first)")
    n = grid_side(num_tokens)
    if n > side:
        raise ValueError(f"num_tokens={num_tokens} is larger than the {L} patch tokens ({side}x{side}) per view")
    if n == side:
        return features
    grid = features.transpose(1, 2).reshape(B, C, side, side).float()
    target = math.ceil(side / n) * n
    if target != side:
        grid = F.interpolate(grid, size=(target, target), mode="bilinear", align_corners=True)
    pooled = F.avg_pool2d(grid, target // n)
    return pooled.flatten(2).transpose(1, 2).to(features.dtype)


class TokenFlexProjector(nn.Module):
    """The token-adaptive projector: pool each view to N tokens, then LayerNorm -> SwiGLU -> the LLM width.

    ``forward(features, num_tokens)``: (B, L, vision_width) patch features of B views -> (B, N, llm_width).
    ``project`` is the MLP alone (per token): ``down(silu(gate(u)) * up(u))`` with ``u = LayerNorm(x)``; no residual,
    no second norm, no dropout (spec section 2, step 5).
    """

    def __init__(self, vision_width: int, llm_width: int, hidden_ratio: int = 3, eps: float = 1e-5):
        super().__init__()
        for arg, value in (("vision_width", vision_width), ("llm_width", llm_width), ("hidden_ratio", hidden_ratio)):
            check_int(value, arg, 1)
        self.vision_width, self.llm_width, self.hidden_ratio, self.eps = vision_width, llm_width, hidden_ratio, eps
        hidden = hidden_ratio * vision_width
        self.norm = nn.LayerNorm(vision_width, eps=eps)
        self.gate = nn.Linear(vision_width, hidden)
        self.up = nn.Linear(vision_width, hidden)
        self.down = nn.Linear(hidden, llm_width)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        u = self.norm(tokens)
        return self.down(F.silu(self.gate(u)) * self.up(u))

    def forward(self, features: torch.Tensor, num_tokens: int) -> torch.Tensor:
        if features.shape[-1] != self.vision_width:
            raise ValueError(f"this TokenFLEX projector reads {self.vision_width}-wide vision features; got "
                             f"{features.shape[-1]}")
        return self.project(pool_grid(features, num_tokens))

    def settings(self) -> dict:
        return dict(vision_width=self.vision_width, llm_width=self.llm_width, hidden_ratio=self.hidden_ratio,
                    eps=self.eps)

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write ``config.json`` and the weights into the folder ``path`` (``dtype``: e.g. float16, half the size)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
                 for k, v in self.state_dict().items()}
        torch.save(state, path / WEIGHTS_FILE)
        (path / CONFIG_FILE).write_text(json.dumps({"format": PROJECTOR_FORMAT, **self.settings()}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenFlexProjector:
        """A projector saved by :meth:`save` (or the trainer), as float32 on the CPU."""
        path = Path(path)
        settings = read_settings(path)
        projector = cls(**settings)
        state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        projector.load_state_dict({k: v.float() for k, v in state.items()})
        return projector.eval()


def read_settings(path: Path) -> dict:
    config = path / CONFIG_FILE
    if not config.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ValueError(f"projector={str(path)!r} is not a saved TokenFLEX projector: expected a folder with "
                         f"{CONFIG_FILE} and {WEIGHTS_FILE} (TokenFlexProjector.save or `vtoken train-tokenflex`)")
    settings = json.loads(config.read_text())
    if settings.pop("format", None) != PROJECTOR_FORMAT:
        raise ValueError(f"projector={str(path)!r}: {config} does not describe a TokenFLEX projector")
    return settings


def scaled_counts(native: int, counts: dict[int, float] | None = None, reference_side: int = PAPER_GRID_SIDE
                  ) -> dict[int, float]:
    """The paper's token-count distribution moved to a model whose views have ``native`` (square) tokens: each
    grid side scales by ``sqrt(native) / reference_side`` (rounded, at least 1, at most the native side); counts that
    meet add their weights. A 27 x 27 grid gets {64: 0.2, 144: 0.3, 256: 0.5} back, a 14 x 14 one {16: 0.2, 36: 0.3,
    64: 0.5}, LLaVA-1.5's 24 x 24 {49: 0.2, 121: 0.3, 196: 0.5}."""
    side = math.isqrt(native)
    out: dict[int, float] = {}
    for count, weight in (counts or PAPER_COUNTS).items():
        n = min(side, max(1, round(grid_side(count, "count") * side / reference_side)))
        out[n * n] = out.get(n * n, 0.0) + weight
    return dict(sorted(out.items()))


def check_counts(counts: dict[int, float], native: int | None = None) -> dict[int, float]:
    """A token-count distribution: perfect squares (at most ``native``) with positive weights, normalised to sum 1."""
    if not isinstance(counts, dict) or not counts:
        raise ValueError(f"token_counts must be a non-empty dict {{count: weight}}; got {counts!r}")
    for count, weight in counts.items():
        try:
            grid_side(count, "count") if native is None else resolve_num_tokens(count, native, "count")
        except ValueError as error:
            raise ValueError(f"token_counts: {error}") from error
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or weight == math.inf:
            raise ValueError(f"token_counts: count {count} has weight {weight!r}; weights must be finite numbers > 0")
    total = sum(counts.values())
    return {int(c): float(w) / total for c, w in sorted(counts.items())}


@register_method("tokenflex", stages=("projector",))
@dataclass
class TokenFlexConfig:
    """TokenFLEX: the LLM sees exactly ``num_tokens`` visual tokens per image view, from a token-adaptive projector.

    ``num_tokens``: an int is the count itself, a perfect square no larger than the model's patch grid (576 for
    LLaVA-1.5's 24 x 24); a float in (0, 1] is a share of the native grid, rounded down to a square grid.
    ``projector``: a trained :class:`TokenFlexProjector` (a module, or the folder ``vtoken train-tokenflex`` /
    ``TokenFlexProjector.save`` wrote); None is the training-free mode, the model's own projector on the pooled grid.
    Change either between calls with ``handle.update(num_tokens=...)``; the patch stays installed.
    """

    num_tokens: int | float
    projector: str | os.PathLike | TokenFlexProjector | None = None

    def __post_init__(self):
        check_num_tokens(self.num_tokens)  # against the model's grid at install time
        if isinstance(self.projector, (str, os.PathLike)):
            read_settings(Path(self.projector))
        elif self.projector is not None and not isinstance(self.projector, TokenFlexProjector):
            raise ValueError("projector must be None (training-free), a TokenFlexProjector or the folder a trained "
                             f"one was saved to; got {type(self.projector).__name__}")

    def load_projector(self) -> TokenFlexProjector | None:
        if isinstance(self.projector, (str, os.PathLike)):
            return TokenFlexProjector.load(self.projector)
        return self.projector


__all__ = ["PAPER_COUNTS", "TokenFlexConfig", "TokenFlexProjector", "check_counts", "check_num_tokens", "grid_side",
           "pool_grid", "resolve_num_tokens", "scaled_counts"]

"""What a VLM token-pruning method sees, and what it returns.

An adapter knows *where* tokens are (which image, which decoder layer, which rows are padding); a method
decides *which* survive. The two meet through the small context objects below, so methods stay pure tensor
code that never imports transformers.

Two stages exist and a method may implement either or both:

* **boundary** (``reduce``): after the multimodal projector, per image. Gets the projected tokens ``(n, D)``
  and returns fewer. The adapter shortens the placeholder run in the prompt to match, so the LLM sees a
  genuinely shorter, contiguous sequence (positions renumbered).
* **in-LLM** (``score_layers`` + ``prune``): during prefill, at the input of a scoring layer. Gets the layer
  input and an attention-row oracle and returns which tokens stay from the *next* layer on. Original RoPE
  positions are kept, so cached decoding stays consistent. Only visual tokens can be dropped; the adapter
  enforces it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vtoken.budget import Budget, check_budget


@dataclass(frozen=True)
class GridSegment:
    """A raster-ordered patch grid inside one image's token run: ``rows x cols`` tokens starting at ``start``.

    ``newline=True`` means each row is followed by one separator token (LLaVA-NeXT's ``image_newline``), so
    row ``r`` occupies ``start + r*(cols+1) ... + cols``.
    """

    start: int
    rows: int
    cols: int
    newline: bool = False

    @property
    def length(self) -> int:
        return self.rows * (self.cols + int(self.newline))

    def patch_index(self) -> torch.Tensor:
        """(rows, cols) indices of the patch tokens of this segment in the image's token run."""
        stride = self.cols + int(self.newline)
        r = torch.arange(self.rows).unsqueeze(1) * stride
        return self.start + r + torch.arange(self.cols).unsqueeze(0)


@dataclass
class ImageContext:
    """One image's projected tokens as the boundary stage sees them."""

    n: int
    segments: list[GridSegment]
    # [CLS]->patch attention of the vision encoder, lazily computed, (n,) with -inf where a token has none
    # (AnyRes high-resolution crops, newline separators). None when the encoder has no [CLS].
    pivot_scores: Callable[[], torch.Tensor | None] = lambda: None
    modality: str = "image"  # "image" or "video"
    # video: the frame (temporal position) of every token, (n,); its segments are one grid per frame, in order
    frames: torch.Tensor | None = None


@dataclass
class Reduction:
    """Result of a boundary reduction for one image or video. ``kept`` are indices into its tokens (sorted)
    when the method selects tokens, or None when it synthesises new ones (pooling)."""

    features: torch.Tensor
    kept: torch.Tensor | None = None
    frames: torch.Tensor | None = None  # video, synthesised tokens: the frame each output token belongs to
    # synthesised tokens: the input token whose place (and position) each output token takes, ascending
    anchors: torch.Tensor | None = None

    def places(self) -> torch.Tensor | None:
        """The input tokens whose placeholders the output tokens fill, ascending; None: the first ones."""
        return self.kept if self.kept is not None else self.anchors


@dataclass
class LayerContext:
    """The input of one decoder layer during prefill, padded to ``(B, L)`` with boolean row sets."""

    layer: int
    num_layers: int
    hidden: torch.Tensor  # (B, L, D) the layer's input
    valid: torch.Tensor  # (B, L) real tokens (not padding)
    visual: torch.Tensor  # (B, L) visual tokens still alive
    n_visual_input: torch.Tensor  # (B,) visual tokens that entered the LLM (budgets resolve against this)
    # attention(rows) -> (B, H, R, L) fp32 softmax probabilities of this layer for query rows ``rows`` (B, R)
    attention: Callable[[torch.Tensor], torch.Tensor]
    # received(rows, weights) -> (B, L) fp32: sum over rows of weight x head-averaged attention each key receives,
    # computed without holding every row's probabilities (the fused scoring kernel's contract)
    received: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # per-sample diagnostics a method wants in ``handle.stats`` (e.g. ToDRE's attention ratios)
    record: dict = field(default_factory=dict)

    @property
    def text(self) -> torch.Tensor:
        return self.valid & ~self.visual

    def last_index(self) -> torch.Tensor:
        """(B,) index of the last real token, the one ``generate`` reads logits from."""
        L = self.valid.shape[1]
        pos = torch.arange(L, device=self.valid.device).expand_as(self.valid)
        return torch.where(self.valid, pos, -1).amax(dim=1)


@dataclass
class VisualTokenMethod:
    """Base config for methods that prune the visual tokens of a VLM. ``keep``: int = tokens kept,
    float in (0, 1] = fraction kept."""

    keep: Budget = 0.25
    boundary: ClassVar[bool] = False
    method_name: ClassVar[str] = ""

    def __post_init__(self):
        self.keep = check_budget(self.keep)

    # boundary stage ------------------------------------------------------------------------------------------
    def reduce(self, features: torch.Tensor, ctx: ImageContext) -> Reduction:
        raise NotImplementedError

    def reduce_batch(self, images: list[tuple[torch.Tensor, ImageContext]]) -> list[Reduction]:
        """All images of one prefill; a method whose work is a loop of small steps batches it here."""
        return [self.reduce(features, ctx) for features, ctx in images]

    # in-LLM stage ----------------------------------------------------------------------------------------------
    def score_layers(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layers whose input is scored; a decision made at layer l takes effect from layer l + 1."""
        return ()

    def prune(self, ctx: LayerContext) -> torch.Tensor:
        """(B, L) bool: tokens that stay from the next layer on."""
        raise NotImplementedError


def check_int(value, arg: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{arg} must be an int; got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        rng = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{arg}={value} is out of range; allowed: {rng}")
    return value


def check_choice(value, arg: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{arg}={value!r} is not allowed; choose one of {', '.join(map(repr, choices))}")


def check_float(value, arg: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float in [low, high]; ``low_open`` / ``high_open`` exclude an end (``high=math.inf`` with
    ``high_open=True`` is "any finite value above low")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{arg} must be a number; got {value!r}")
    value = float(value)
    bad_low = value <= low if low_open else value < low
    bad_high = value >= high if high_open else value > high
    if bad_low or bad_high or value != value:
        allowed = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{arg}={value} is out of range; allowed: {allowed}")
    return value


__all__ = [
    "GridSegment", "ImageContext", "LayerContext", "Reduction", "VisualTokenMethod",
    "check_choice", "check_float", "check_int",
]

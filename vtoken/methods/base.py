"""What a VLM token-pruning method sees, and what it returns.

An adapter knows *where* tokens are (which image, which decoder layer, which rows are padding); a method
decides *which* survive. The two meet through the small context objects below, so methods stay pure tensor
code that never imports transformers.

Two stages exist and a method may implement either or both:

* **boundary** (``reduce``): after the multimodal projector, per image. Gets the projected tokens ``(n, D)``
  and returns fewer. The adapter shortens the placeholder run in the prompt to match, so the LLM sees a
  genuinely shorter, contiguous sequence (positions renumbered).
* **in-LLM** (``score_layers`` + ``prune``): during prefill, at the input of a scoring layer. Gets the layer
  input and an attention-row oracle and returns which tokens stay from the *next* layer on (or from the scored
  layer itself, with ``prune_at_scored_layer``). Original RoPE positions are kept, so cached decoding stays
  consistent. Only visual tokens can be dropped; the adapter enforces it.

An in-LLM method may also watch what decoder sub-layers do to each token during prefill (``observed_sublayers`` +
``observe``, e.g. TransPrune's token transition variation), and, once prefill is over, ask for a cheaper decode
(``after_prefill``: FFN neurons per row for ``decode_ffn_layers``, e.g. CoreMatching's core neurons) or for cached
K/V entries to be zeroed (CoreMatching's released code).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vtoken.budget import Budget, check_budget, round_half_up


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
class TowerTokens:
    """What the vision tower's layer whose output the projector reads says about an item's tokens, mapped onto them
    the way the host maps that layer's patches (AnyRes crops unpadded, views scaled down or pooled, patch groups
    merged): attention summed over a token's patches, keys averaged."""

    # (n,) fp32 attention each token receives: from the [CLS] token (``source == "cls"``), or, in a tower without
    # one, averaged over every query of its view (``"received"``); -inf for a token with no patch (a separator)
    attention: torch.Tensor
    keys: torch.Tensor  # (n, d) fp32 key states averaged over heads; zero for a token with no patch
    source: str  # "cls" or "received"


@dataclass
class ImageContext:
    """One image's projected tokens as the boundary stage sees them."""

    n: int
    segments: list[GridSegment]
    # [CLS]->patch attention of the vision encoder, lazily computed, (n,) with -inf where a token has none
    # (AnyRes high-resolution crops, newline separators). None when the encoder has no [CLS].
    pivot_scores: Callable[[], torch.Tensor | None] = lambda: None
    # the tower's attention and keys on these tokens, lazily computed; set by hosts with the "tower_attention"
    # stage, None elsewhere or when the tower's tokens cannot be mapped (e.g. a clustering tower changed them)
    tower: Callable[[], TowerTokens | None] = lambda: None
    modality: str = "image"  # "image" or "video"
    # video: the frame (temporal position) of every token, (n,); its segments are one grid per frame, in order
    frames: torch.Tensor | None = None
    # instruction() -> ((L, D) the LLM input embeddings of the item's prompt row, (L,) bool: its instruction tokens,
    # the real text after the row's last visual placeholder), the same tensors for every item of one row; set for
    # methods with ``conditioned = True``
    instruction: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None


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
    n_visual_input: list[int]  # per sample, visual tokens that entered the LLM (budgets resolve against this; host)
    # attention(rows) -> (B, H, R, L) fp32 softmax probabilities of this layer for query rows ``rows`` (B, R)
    attention: Callable[[torch.Tensor], torch.Tensor]
    # received(rows, weights) -> (B, L) fp32: sum over rows of weight x head-averaged attention each key receives,
    # computed without holding every row's probabilities (the fused scoring kernel's contract)
    received: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # keys() -> (B, H_kv, L, D) this layer's key states before RoPE (k projection of its normalised input, with the
    # per-head norm where the model has one), as its attention computes them from ``hidden``; position-independent
    keys: Callable[[], torch.Tensor] | None = None
    # final_norm(x) -> the decoder's final norm of ``x`` (B, L, D), the one before the LM head
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    # per-sample diagnostics a method wants in ``handle.stats`` (e.g. ToDRE's attention ratios)
    record: dict = field(default_factory=dict)
    # (B, L) LLM-input position of each row: aligns this layer's rows with what ``observe`` saw at earlier layers
    positions: torch.Tensor | None = None
    # per-prefill scratch space of the method, shared with its ``observe`` calls
    state: dict = field(default_factory=dict)
    # set by ``prune`` when it knows, per sample, how many visual tokens its mask keeps (a fixed budget): the adapter
    # then sizes the compacted batch without reading the device; left None, it reads the counts once
    kept: list[int] | None = None
    # per sample, on the host: real slots at this layer (every token but fillers, padding included) and visual tokens
    # among them, so a method can size its work without reading the device (None: not known)
    alive_counts: list[int] | None = None
    visual_counts: list[int] | None = None

    def text_width(self) -> int:
        """An upper bound, known on the host, of any sample's non-visual tokens at this layer."""
        if self.alive_counts is None or self.visual_counts is None:
            return self.valid.shape[1]
        return max(1, max(a - v for a, v in zip(self.alive_counts, self.visual_counts)))

    def visual_width(self) -> int:
        """An upper bound, known on the host, of any sample's visual tokens at this layer."""
        return self.valid.shape[1] if self.visual_counts is None else max(1, max(self.visual_counts))

    @property
    def text(self) -> torch.Tensor:
        return self.valid & ~self.visual

    def last_index(self) -> torch.Tensor:
        """(B,) index of the last real token, the one ``generate`` reads logits from."""
        L = self.valid.shape[1]
        pos = torch.arange(L, device=self.valid.device).expand_as(self.valid)
        return torch.where(self.valid, pos, -1).amax(dim=1)


# What ``SublayerContext.input`` / ``output`` hold, per kind of decoder sub-layer:
#   "attention"  the attention block's normalised input (after input_layernorm) / its output before the residual add
#   "mlp"        the MLP's normalised input (after post_attention_layernorm) / its output before the residual add
#   "mlp_hidden" the MLP's hidden activation (SwiGLU: act(gate(x)) * up(x), the input of down_proj) / the MLP output
SUBLAYER_KINDS = ("attention", "mlp", "mlp_hidden")


@dataclass
class SublayerContext:
    """One decoder sub-layer call during prefill, as ``observe`` sees it: rows are the tokens alive at this layer."""

    layer: int
    num_layers: int
    kind: str  # one of SUBLAYER_KINDS
    input: torch.Tensor  # (B, L, D_in)
    output: torch.Tensor  # (B, L, D_out)
    valid: torch.Tensor  # (B, L) real tokens (not padding, not the filler slots of shorter rows)
    visual: torch.Tensor  # (B, L) visual tokens
    positions: torch.Tensor  # (B, L) LLM-input position of each row
    n_positions: int  # LLM-input length: per-position buffers of a prefill have this many columns
    state: dict  # per-prefill scratch space, shared with ``LayerContext.state``


@dataclass
class PrefillOutcome:
    """What a method asks of the rest of a generation once its prefill is over (``after_prefill``)."""

    # decoder layer -> (B, k) neurons each row's FFN computes in later single-token steps (every layer the same k);
    # a row of -1 computes every neuron (a prompt without visual tokens decodes as the dense model does)
    decode_neurons: dict[int, torch.Tensor] = field(default_factory=dict)
    # decoder layer -> (B, L0) LLM-input positions whose cached keys and values are set to zero in that layer
    zero_kv: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class VisualTokenMethod:
    """Base config for methods that prune the visual tokens of a VLM. ``keep``: int = tokens kept,
    float in (0, 1] = fraction kept."""

    keep: Budget = 0.25
    method_name: ClassVar[str] = ""
    stages: ClassVar[tuple[str, ...]] = ()  # where it works (``vtoken.registry.STAGES``), set by register_method
    conditioned: ClassVar[bool] = False  # its boundary stage reads the prompt's instruction (ImageContext.instruction)

    @property
    def boundary(self) -> bool:
        """Whether it reduces tokens at the multimodal boundary (``reduce``)."""
        return "boundary" in self.stages

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
        """Decoder layers whose input is scored; a decision made at layer l takes effect from layer l + 1 (from
        layer l itself with ``prune_at_scored_layer``)."""
        return ()

    def prune(self, ctx: LayerContext) -> torch.Tensor:
        """(B, L) bool: tokens that stay from the next layer on (with ``prune_at_scored_layer``: from this one)."""
        raise NotImplementedError

    # True: a decision made at layer l's input removes the tokens before layer l runs (a method that scores the
    # output of layer l-1, as TransPrune and CoreMatching do, acts where the paper acts instead of a layer late).
    prune_at_scored_layer: ClassVar[bool] = False

    def observed_sublayers(self, num_layers: int) -> dict[str, tuple[int, ...]]:
        """Sub-layer kind (``SUBLAYER_KINDS``) -> decoder layers whose calls ``observe`` sees during prefill."""
        return {}

    def observe(self, ctx: SublayerContext) -> None:
        raise NotImplementedError

    def decode_ffn_layers(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layers whose FFN may run only the neurons ``after_prefill`` names, in single-token steps."""
        return ()

    def after_prefill(self, state: dict) -> PrefillOutcome | None:
        """Called once a prefill that wrote a KV cache is over, with the prefill's ``state``."""
        return None


def instruction_rows(ctx: LayerContext) -> torch.Tensor:
    """(B, L) the real text tokens after each sample's last visual token: the question and the chat template's
    suffix (TransPrune's IGA queries, DART's text pivots)."""
    return text_after_last_visual(ctx.visual, ctx.valid)


def text_after_last_visual(visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, L) the real non-visual tokens after each row's last visual token, from (B, L) row sets."""
    pos = torch.arange(valid.shape[1], device=valid.device)
    last_visual = torch.where(visual, pos, -1).amax(dim=1, keepdim=True)
    return valid & ~visual & (pos > last_visual)


def scale_layers(layers: tuple[int, ...], depth: int, num_layers: int) -> dict[int, int]:
    """A schedule's layers of a ``depth``-layer decoder moved to ``num_layers`` layers (``round(p * L / depth)``, halves
    up, within 1 ... L-1). Layers that land on the same one merge: each moved layer maps to the 1-based number of
    the last original layer it holds, so a merged stage goes as far as the later of its stages."""
    moved: dict[int, int] = {}
    for number, p in enumerate(layers, start=1):
        moved[min(max(round_half_up(p * num_layers / depth), 1), num_layers - 1)] = number
    return moved

__all__ = [
    "SUBLAYER_KINDS", "GridSegment", "ImageContext", "LayerContext", "PrefillOutcome", "Reduction", "SublayerContext",
    "TowerTokens", "VisualTokenMethod", "instruction_rows", "scale_layers", "text_after_last_visual",
]

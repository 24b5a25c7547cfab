"""Every upstream internal vtoken reads, in one place: transformers, diffusers, timm, open_clip and torch.

Lookups go by feature (a type, a parameter of a signature, an attribute), never by version string, so an upstream
rename is a one-line change here and a failing test in tests/test_compat.py, not a silently wrong result in an
adapter. Adapters import these names instead of reaching into the libraries themselves.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import re
import warnings
from typing import Any, NamedTuple

# ------------------------------------------------------------------------------------------------------------
# Installed versions against the ranges vtoken declares
# ------------------------------------------------------------------------------------------------------------
CHECKED = ("torch", "transformers", "timm", "open-clip-torch", "accelerate", "diffusers", "lmms-eval")


def declared_ranges(distribution: str = "vtoken", names: tuple[str, ...] | None = CHECKED) -> dict[str, str]:
    """Package -> version specifier, as declared in pyproject.toml (read back from the installed metadata, so the
    check can never drift from what pip enforces), for ``names`` (None: every requirement, extras' pins included).
    Empty when vtoken runs from a source tree without metadata."""
    try:
        requirements = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    return ranges_of(requirements, names)


def ranges_of(requirements: list[str], names: tuple[str, ...] | None = None) -> dict[str, str]:
    """Package -> specifier (lower bound first) of requirement lines such as ``torch>=2.11,<2.16; extra == ...``."""
    out = {}
    for line in requirements:
        match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*([^;]*)", line)
        name, spec = match.group(1).lower(), match.group(2).strip()
        if (names is None or name in names) and spec:
            out[name] = ",".join(sorted(spec.split(","), key=lambda part: not part.startswith(">")))  # low, high
    return out


def untested_versions(installed: dict[str, str | None], ranges: dict[str, str]) -> list[str]:
    """Human-readable lines for installed versions outside the declared (= tested) ranges."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    out = []
    for name, spec in ranges.items():
        version = installed.get(name)
        if version is None:
            continue
        try:
            inside = Version(version) in SpecifierSet(spec)
        except InvalidVersion:
            continue
        if not inside:
            out.append(f"{name} {version} (tested: {spec})")
    return out


def installed_versions(names=CHECKED) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.cache
def warn_untested_versions() -> list[str]:
    """Warn once per process when an installed dependency is outside the range vtoken was tested with."""
    lines = untested_versions(installed_versions(), declared_ranges())
    if lines:
        warnings.warn(
            "vtoken was not tested with " + ", ".join(lines) + ". Results may be wrong; install versions inside the "
            "tested ranges (pip install -e . resolves them) or report what breaks.",
            RuntimeWarning, stacklevel=2,
        )
    return lines


# ------------------------------------------------------------------------------------------------------------
# transformers: the call chain of a VLM
# ------------------------------------------------------------------------------------------------------------
# The multimodal forward's keyword for encoder outputs that generate() computed before prefill (transformers >= 5.18;
# earlier releases silently drop it, so the images never reach the LLM).
ENCODER_OUTPUTS = "mm_encoder_outputs"

# Keywords a Llama-like decoder layer receives, by what the in-LLM hooks do with them. The cache itself is found by
# type (transformers 5.24 renamed ``past_key_values`` to ``cache``), so its keyword only needs to be known here.
SLICED_LAYER_KWARGS = frozenset({"hidden_states", "attention_mask", "position_ids", "position_embeddings"})
PASSED_LAYER_KWARGS = frozenset({"cache", "past_key_values", "use_cache", "output_attentions"})


# generate()'s argument to ``prepare_inputs_for_generation``: how many trailing input columns the model has not seen
# (it counts the cache's slots, which undercounts a conversation whose earlier turns vtoken shortened).
GENERATE_UNSEEN = "next_sequence_length"


def unknown_layer_kwargs(kwargs: dict) -> list[str]:
    """Keywords a decoder layer got that the in-LLM hooks neither slice nor know to be safe to pass unchanged."""
    return sorted(set(kwargs) - SLICED_LAYER_KWARGS - PASSED_LAYER_KWARGS)


@functools.cache
def _cache_types() -> tuple[type, type]:
    from transformers.cache_utils import Cache, DynamicCache

    return Cache, DynamicCache


def find_cache(values: Any):
    """The KV cache among a call's keyword arguments (a dict) or a model output, found by its type, not its name."""
    cache_cls = _cache_types()[0]
    items = values.values() if hasattr(values, "values") else ()
    for value in items:
        if isinstance(value, cache_cls):
            return value
    return None


def is_dynamic_cache(cache) -> bool:
    """A cache whose layers may hold different lengths (what dropping tokens between decoder layers needs)."""
    return isinstance(cache, _cache_types()[1])


def is_static_cache(cache) -> bool:
    """A cache of fixed slots (``StaticCache``): every layer's masks span all its slots, written or not."""
    return cache is not None and not is_dynamic_cache(cache)


def static_slots(cache) -> int:
    """How many slots each full-attention layer of a static cache holds (what its masks span)."""
    return cache.layers[0].max_cache_len


def sliding_cache_layers(cache) -> list[int]:
    """The layers of a cache that keep only a window of slots."""
    return [i for i, layer in enumerate(getattr(cache, "layers", ())) if getattr(layer, "is_sliding", False)]


def accepts_encoder_outputs(base_model) -> bool:
    """Whether this multimodal model's forward takes precomputed encoder outputs from ``generate()``."""
    return ENCODER_OUTPUTS in inspect.signature(base_model.forward).parameters


QWEN_VL_CLASSES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                   "Qwen3VLForConditionalGeneration")


@functools.cache
def qwen_vl_classes() -> tuple[type, ...]:
    """The Qwen-VL model classes this transformers release has."""
    import transformers

    return tuple(cls for name in QWEN_VL_CLASSES if (cls := getattr(transformers, name, None)) is not None)


def attn_implementation(config) -> str:
    return getattr(config, "_attn_implementation", None) or "eager"


def vision_encoder(tower):
    """The CLIP-like transformer inside a vision tower or CLIP model, whichever ``vision_model`` nesting this
    transformers release uses (5.2x flattened it away in LLaVA's tower)."""
    while hasattr(tower, "vision_model"):
        tower = tower.vision_model
    return tower


def decoder_of(vlm_base):
    """(decoder, vision tower) of a multimodal ``model.model`` (LLaVA: ``vision_tower``, Qwen-VL: ``visual``)."""
    tower = getattr(vlm_base, "vision_tower", None)
    return vlm_base.language_model, tower if tower is not None else vlm_base.visual


# What a LLaVA-like ``model.model.get_image_features`` calls after the vision tower, by attribute on the instance:
# the projector (called on the selected features of every view, (views, L, C)) and, in LLaVA-NeXT, the AnyRes
# packing ``pack_image_features(image_features, image_sizes, vision_feature_select_strategy=..., image_newline=...)``
# that returns (per-image features, lengths). TokenFLEX shadows both on the instance.
PROJECTOR_ATTR = "multi_modal_projector"
PACK_FEATURES_ATTR = "pack_image_features"


def projector_of(vlm_base):
    return getattr(vlm_base, PROJECTOR_ATTR)


def vision_features(vlm_base, pixel_values, feature_layer, strategy: str):
    """(views, L, C) the features a LLaVA-like model's projector reads: the tower's hidden states at ``feature_layer``
    (several layers are concatenated on the channels), [CLS] dropped unless ``strategy == "full"``."""
    import torch

    out = vlm_base.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    layers = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
    selected = torch.cat([out.hidden_states[layer] for layer in layers], dim=-1)
    return selected if strategy == "full" else selected[:, 1:]


class DecoderAttention(NamedTuple):
    """What recomputing one Llama-like decoder layer's attention rows needs."""

    input_norm: Any
    q_proj: Any
    k_proj: Any
    q_norm: Any  # per-head norms (Qwen3-style) or None
    k_norm: Any
    head_dim: int
    scaling: float


def decoder_attention(layer) -> DecoderAttention:
    attn = layer.self_attn
    return DecoderAttention(layer.input_layernorm, attn.q_proj, attn.k_proj, getattr(attn, "q_norm", None),
                            getattr(attn, "k_norm", None), attn.head_dim, attn.scaling)


def decoder_final_norm(decoder):
    """The norm a decoder applies after its last layer (Llama, Qwen2 and Qwen3 text models: ``norm``)."""
    return decoder.norm


def decoder_sublayer(layer, kind: str):
    """The module whose forward call carries a decoder sub-layer's input and output (``methods.base.SUBLAYER_KINDS``):
    the attention block, the MLP, or the MLP's down projection (its input is the hidden activation)."""
    if kind == "attention":
        return layer.self_attn
    if kind == "mlp":
        return layer.mlp
    return layer.mlp.down_proj


def module_io(args: tuple, kwargs: dict, output) -> tuple[Any, Any]:
    """(input, output) of a module call seen by a forward hook: Llama attention takes ``hidden_states`` by keyword
    and returns ``(output, weights)``; the MLP and its projections take and return one tensor."""
    x = args[0] if args else kwargs["hidden_states"]
    return x, output[0] if isinstance(output, tuple) else output


class GatedMLP(NamedTuple):
    """A SwiGLU-style MLP: ``down(act(gate(x)) * up(x))`` (Llama, Mistral, Qwen2 decoders)."""

    module: Any
    gate: Any
    up: Any
    down: Any
    act: Any


def gated_mlp(layer) -> GatedMLP | None:
    """The decoder layer's MLP as a gated MLP, or None when it is not one."""
    mlp = layer.mlp
    parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")]
    return None if any(p is None for p in parts) else GatedMLP(mlp, *parts)


def cache_layer_kv(cache, index: int) -> tuple[Any, Any]:
    """The (B, heads, slots, head_dim) key and value tensors a DynamicCache holds for one decoder layer."""
    layer = cache.layers[index]
    return layer.keys, layer.values


class EncoderAttention(NamedTuple):
    """What recomputing one vision encoder layer's attention from its input needs: ``norm`` before attention, the
    query and key projections and the per-projection norms after them (InternViT's qk norm; identity elsewhere)."""

    norm: Any
    q_proj: Any
    k_proj: Any
    num_heads: int
    head_dim: int
    scale: float
    q_norm: Any = None
    k_norm: Any = None


def vision_attention(layer) -> EncoderAttention:
    """The attention of one CLIP / SigLIP (``layer_norm1``, ``self_attn``) or InternViT (``layernorm_before``,
    ``attention`` with ``q_norm`` / ``k_norm``) encoder layer."""
    if hasattr(layer, "self_attn"):
        attn = layer.self_attn
        return EncoderAttention(layer.layer_norm1, attn.q_proj, attn.k_proj, attn.num_heads, attn.head_dim,
                                attn.scale)
    attn = layer.attention
    return EncoderAttention(layer.layernorm_before, attn.q_proj, attn.k_proj, attn.num_heads, attn.head_dim,
                            attn.scale, attn.q_norm, attn.k_norm)


class QwenVisionAttention(NamedTuple):
    """What recomputing a Qwen-VL vision block's attention from its input needs: the norm before attention, the
    fused q/k/v projection, the head count and the softmax scale (RoPE comes in the block's ``position_embeddings``)."""

    norm: Any
    qkv: Any
    num_heads: int
    scale: float


def qwen_vision_attention(block) -> QwenVisionAttention:
    """The attention of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision block (``norm1``, ``attn.qkv``)."""
    return QwenVisionAttention(block.norm1, block.attn.qkv, block.attn.num_heads, block.attn.scaling)


# the Qwen2.5-VL tower's method that puts patches (and their RoPE rows) in window order; its first call's argument is
# the window order, whose inverse the tower applies to its merged tokens
QWEN_WINDOW_PERMUTE = "permute_input_for_window_attn"


def has_cls_token(tower) -> bool:
    """Whether a vision tower prepends a [CLS] token (CLIP: ``class_embedding``; InternViT: ``cls_token``)."""
    embeddings = vision_encoder(tower).embeddings
    return hasattr(embeddings, "class_embedding") or hasattr(embeddings, "cls_token")


def square_size(size) -> int:
    """A vision config's square ``image_size`` / ``patch_size``, given as an int or as (height, width) (InternVL)."""
    return size[0] if isinstance(size, (list, tuple)) else size


def vision_blocks(tower) -> Any:
    """The transformer blocks of a VLM's vision tower (CLIP / SigLIP: ``encoder.layers``; InternViT:
    ``encoder.layer``)."""
    encoder = vision_encoder(tower).encoder
    return encoder.layers if hasattr(encoder, "layers") else encoder.layer


def clip_parts(tower) -> tuple[Any, Any, bool]:
    """(embeddings, encoder layers, has [CLS]) of a CLIP-like vision transformer."""
    encoder = vision_encoder(tower)
    embeddings = encoder.embeddings
    return embeddings, encoder.encoder.layers, hasattr(embeddings, "class_embedding")


# ------------------------------------------------------------------------------------------------------------
# timm / open_clip ViTs
# ------------------------------------------------------------------------------------------------------------
def timm_vit_parts(model) -> dict:
    return dict(blocks=model.blocks, patch_conv=getattr(model.patch_embed, "proj", None),
                num_prefix=model.num_prefix_tokens, grid=tuple(model.patch_embed.grid_size))


def open_clip_parts(visual) -> dict:
    transformer = visual.transformer
    # open_clip < 2.2x runs the blocks on (L, N, D) and has no flag
    return dict(blocks=transformer.resblocks, patch_conv=visual.conv1, num_prefix=1, grid=tuple(visual.grid_size),
                batch_first=getattr(transformer, "batch_first", False))


# ------------------------------------------------------------------------------------------------------------
# diffusers
# ------------------------------------------------------------------------------------------------------------
def diffusers_apply_rotary_emb():
    """HunyuanVideo's RoPE application (a diffusers helper, not public API)."""
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb


# ------------------------------------------------------------------------------------------------------------
# torch
# ------------------------------------------------------------------------------------------------------------
def compiled_graphs() -> int:
    """How many graphs TorchDynamo has compiled in this process so far (a benchmark's warm-up runs until a run adds
    none). Its counters are internal to torch."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]

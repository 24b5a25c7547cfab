"""Analytic prefill FLOPs (2 x multiply-adds) from the token count each layer actually saw.

The decoder term is FastV/DivPrune's ``4nd^2 + 2n^2 d + 2ndm`` per layer written out for GQA and gated MLPs:
q/k/v/o projections, the full square of QK^T and AV (no causal discount, as in those papers), and the MLP.
"""

from __future__ import annotations


def decoder_layer_flops(n: int, cfg) -> float:
    d = cfg.hidden_size
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    projections = 2 * n * d * (2 * heads * head_dim + 2 * kv_heads * head_dim)
    attention = 4 * n * n * heads * head_dim
    gated = getattr(cfg, "hidden_act", "silu") in ("silu", "swish", "gelu_pytorch_tanh") or hasattr(cfg, "mlp_bias")
    mlp = 2 * n * d * cfg.intermediate_size * (3 if gated else 2)
    return float(projections + attention + mlp)


def vision_flops(views: int, vcfg, block_tokens: list[int] | None = None) -> float:
    """A CLIP-like tower over ``views`` crops. ``block_tokens``: the tokens each block saw (a method that clusters
    inside the tower shortens the later ones); None = every block sees every patch + [CLS] (HF runs the whole tower).
    """
    return sum(flops for _, flops, _ in vision_parts(views, vcfg, block_tokens))


def vision_parts(views: int, vcfg, block_tokens: list[int] | None = None) -> list[tuple[str, float, float]]:
    """(name, FLOPs, weights) of the patch embedding and of every block of the tower, over ``views`` crops."""
    full = (vcfg.image_size // vcfg.patch_size) ** 2 + 1
    block_tokens = block_tokens or [full] * vcfg.num_hidden_layers
    d, m = vcfg.hidden_size, vcfg.intermediate_size
    patch_weights = 3 * vcfg.patch_size**2 * d + full * d  # convolution + position embedding
    parts = [("vision embed", float(views * 2 * (full - 1) * 3 * vcfg.patch_size**2 * d), float(patch_weights))]
    for i, n in enumerate(block_tokens):
        flops = 2 * n * d * 4 * d + 4 * n * n * d + 2 * n * d * m * 2
        parts.append((f"vision block {i}", float(views * flops), float(4 * d * d + 2 * d * m + 9 * d + m)))
    return parts


def decoder_layer_weights(cfg) -> float:
    """Weights of one decoder layer (projections, MLP, two norms): what a prefill reads from memory per layer."""
    d = cfg.hidden_size
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    gated = getattr(cfg, "hidden_act", "silu") in ("silu", "swish", "gelu_pytorch_tanh") or hasattr(cfg, "mlp_bias")
    return float(d * (2 * heads * head_dim + 2 * kv_heads * head_dim) + d * cfg.intermediate_size * (3 if gated else 2)
                 + 2 * d)


def prefill_parts(config, tokens_per_layer: list[list[int]], views: int, projected_tokens: int,
                  tower_tokens: list[int] | None = None) -> list[tuple[str, float, float]]:
    """(name, FLOPs, weights) of every part of one prefill of a batch, in the order they run: the roofline's input
    (each part does its FLOPs and reads its weights once per batch)."""
    text = config.text_config
    vision_dim = config.vision_config.hidden_size * (
        len(config.vision_feature_layer) if isinstance(config.vision_feature_layer, (list, tuple)) else 1)
    d = text.hidden_size
    parts = vision_parts(views, config.vision_config, tower_tokens)
    parts.append(("projector", projector_flops(projected_tokens, config), float(vision_dim * d + d * d + 2 * d)))
    layer_weights = decoder_layer_weights(text)
    for i, counts in enumerate(tokens_per_layer):
        parts.append((f"decoder layer {i}", sum(decoder_layer_flops(n, text) for n in counts), layer_weights))
    batch = len(tokens_per_layer[0])
    parts.append(("lm head", float(2 * d * text.vocab_size * batch), float(d * text.vocab_size + d)))
    return parts


def projector_flops(n_tokens: int, config) -> float:
    vision_dim = config.vision_config.hidden_size
    layers = config.vision_feature_layer
    if isinstance(layers, (list, tuple)):
        vision_dim *= len(layers)
    d = config.text_config.hidden_size
    return float(2 * n_tokens * (vision_dim * d + d * d))


def prefill_flops(config, tokens_per_layer: list[list[int]], views: int, projected_tokens: int,
                  tower_tokens: list[int] | None = None) -> dict[str, float]:
    """FLOPs of one prefill of a batch: vision tower (``tower_tokens`` per block, see ``vision_flops``), projector,
    decoder (per-layer, per-sample counts)."""
    text = config.text_config
    decoder = sum(decoder_layer_flops(n, text) for layer in tokens_per_layer for n in layer)
    head = 2 * text.hidden_size * text.vocab_size * len(tokens_per_layer[0])  # logits of the last token only
    vision = vision_flops(views, config.vision_config, tower_tokens)
    projector = projector_flops(projected_tokens, config)
    return {"vision": vision, "projector": projector, "decoder": decoder + head,
            "total": vision + projector + decoder + head,
            "parts": prefill_parts(config, tokens_per_layer, views, projected_tokens, tower_tokens)}

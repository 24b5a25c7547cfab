"""Analytic prefill FLOPs (2 x multiply-adds) from the token count each layer actually saw.

The decoder term is FastV/DivPrune's ``4nd^2 + 2n^2 d + 2ndm`` per layer written out for GQA and gated MLPs:
q/k/v/o projections, the full square of QK^T and AV (no causal discount, as in those papers), and the MLP.
"""

from __future__ import annotations

from vtoken.adapters._compat import square_size


def decoder_layer_flops(n: int, cfg) -> float:
    d = cfg.hidden_size
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    projections = 2 * n * d * (2 * heads * head_dim + 2 * kv_heads * head_dim)
    attention = 4 * n * n * heads * head_dim
    gated = getattr(cfg, "hidden_act", "silu") in ("silu", "swish", "gelu_pytorch_tanh") or hasattr(cfg, "mlp_bias")
    mlp = 2 * n * d * cfg.intermediate_size * (3 if gated else 2)
    return float(projections + attention + mlp)


def vision_parts(views: int, vcfg, block_tokens: list[int] | None = None) -> list[tuple[str, float, float]]:
    """(name, FLOPs, weights) of the patch embedding and of every block of the tower, over ``views`` crops."""
    side = square_size(vcfg.image_size) // square_size(vcfg.patch_size)
    full = side**2 + int("siglip" not in vcfg.model_type)  # a [CLS] token but in SigLIP
    block_tokens = block_tokens or [full] * vcfg.num_hidden_layers
    d, m = vcfg.hidden_size, vcfg.intermediate_size
    patch = square_size(vcfg.patch_size)
    patch_weights = 3 * patch**2 * d + full * d  # convolution + position embedding
    parts = [("vision embed", float(views * 2 * (full - 1) * 3 * patch**2 * d), float(patch_weights))]
    for i, n in enumerate(block_tokens):
        flops = 2 * n * d * 4 * d + 4 * n * n * d + 2 * n * d * m * 2
        parts.append((f"vision block {i}", float(views * flops), float(4 * d * d + 2 * d * m + 9 * d + m)))
    return parts


def qwen_vision_parts(vcfg, grids: list[list[int]]) -> list[tuple[str, float, float]]:
    """(name, FLOPs, weights) of a Qwen-VL vision encoder over items of (t, h, w) patch grids: the 3-D patch
    embedding, every block (Qwen2.5-VL: windowed attention over ``window_size`` px squares except the full-attention
    blocks; every block attends within one temporal patch, as the encoder does), and the 2x2 merger(s) into the LLM
    width (Qwen3-VL adds one merger per deepstack layer)."""
    d = getattr(vcfg, "embed_dim", None) or vcfg.hidden_size  # Qwen2-VL names the ViT width embed_dim
    out = getattr(vcfg, "out_hidden_size", None) or vcfg.hidden_size
    gated = vcfg.model_type.startswith("qwen2_5")  # SwiGLU; Qwen2-VL and Qwen3-VL use a plain two-layer MLP
    m = getattr(vcfg, "intermediate_size", None) or d * vcfg.mlp_ratio
    merge = vcfg.spatial_merge_size
    frames = [(t, h * w) for t, h, w in grids]  # per item: temporal patches, patches per temporal patch
    n = sum(t * hw for t, hw in frames)
    window = (vcfg.window_size // vcfg.patch_size) ** 2 if getattr(vcfg, "window_size", None) else None
    full_blocks = set(getattr(vcfg, "fullatt_block_indexes", None) or range(vcfg.depth)) if window else None
    patch = 3 * vcfg.temporal_patch_size * vcfg.patch_size**2
    parts = [("vision embed", float(2 * n * patch * d), float(patch * d))]
    mlp_weights = d * m * (3 if gated else 2)
    for i in range(vcfg.depth):
        if window is None or i in full_blocks:
            attention = sum(4 * t * hw * hw * d for t, hw in frames)
        else:
            attention = 4 * n * min(window, max(hw for _, hw in frames)) * d
        flops = 2 * n * d * 4 * d + attention + 2 * n * mlp_weights
        parts.append((f"vision block {i}", float(flops), float(4 * d * d + mlp_weights + 4 * d)))
    merged = n // merge**2
    wide = d * merge**2
    for j in range(1 + len(getattr(vcfg, "deepstack_visual_indexes", None) or [])):
        parts.append((f"merger {j}", float(2 * merged * (wide * wide + wide * out)), float(wide * wide + wide * out)))
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
                  tower_tokens: list[int] | None = None,
                  grids: list[list[int]] | None = None) -> list[tuple[str, float, float]]:
    """(name, FLOPs, weights) of every part of one prefill of a batch, in the order they run: the roofline's input
    (each part does its FLOPs and reads its weights once per batch). ``grids``: a Qwen-VL model's (t, h, w) patch
    grids, one per image or video (its merger is its projector)."""
    text = config.text_config
    d = text.hidden_size
    if grids is not None:
        parts = qwen_vision_parts(config.vision_config, grids)
    else:
        vision_dim = projector_input_width(config)
        parts = vision_parts(views, config.vision_config, tower_tokens)
        parts.append(("projector", projector_flops(projected_tokens, config), float(vision_dim * d + d * d + 2 * d)))
    layer_weights = decoder_layer_weights(text)
    for i, counts in enumerate(tokens_per_layer):
        parts.append((f"decoder layer {i}", sum(decoder_layer_flops(n, text) for n in counts), layer_weights))
    batch = len(tokens_per_layer[0])
    parts.append(("lm head", float(2 * d * text.vocab_size * batch), float(d * text.vocab_size + d)))
    return parts


def projector_input_width(config) -> int:
    """Width of each token the projector reads: the tower's, times the vision layers concatenated, times the patches
    InternVL's pixel shuffle folds into one token (1 / ratio^2)."""
    layers = config.vision_feature_layer
    concatenated = len(layers) if isinstance(layers, (list, tuple)) else 1
    return config.vision_config.hidden_size * concatenated * round(getattr(config, "downsample_ratio", 1.0) ** -2)


def projector_flops(n_tokens: int, config) -> float:
    vision_dim = projector_input_width(config)
    d = config.text_config.hidden_size
    return float(2 * n_tokens * (vision_dim * d + d * d))


def prefill_flops(config, tokens_per_layer: list[list[int]], views: int, projected_tokens: int,
                  tower_tokens: list[int] | None = None, grids: list[list[int]] | None = None) -> dict[str, float]:
    """FLOPs of one prefill of a batch: vision tower (``tower_tokens`` per block, see ``vision_flops``; Qwen-VL:
    ``grids``, see ``qwen_vision_parts``), projector, decoder (per-layer, per-sample counts)."""
    parts = prefill_parts(config, tokens_per_layer, views, projected_tokens, tower_tokens, grids)
    total = lambda names: float(sum(f for name, f, _ in parts if name.startswith(names)))
    return {"vision": total(("vision",)), "projector": total(("projector", "merger")),
            "decoder": total(("decoder", "lm head")), "total": total(("",)), "parts": parts}

"""Diffusers video DiTs: Wan 2.1 / 2.2 and HunyuanVideo, a transformer or a pipeline holding one.

This adapter says where things are: which transformers a model holds, each one's self-attention modules in layer
order (Wan ``blocks[i].attn1``; Hunyuan ``transformer_blocks[i].attn`` then ``single_transformer_blocks[j].attn``,
numbered on), and how each computes its self-attention Q, K and V (projections, QK-norm, RoPE) exactly as its own
processor does. What replaces the attention comes from a bridge (SVG2: ``adapters/bridges/dit_svg2.py``).
"""

from __future__ import annotations

import torch

from vtoken.adapters import _compat
from vtoken.registry import register_host

WAN = "WanTransformer3DModel"
HUNYUAN = "HunyuanVideoTransformer3DModel"


def is_class(obj, class_name: str) -> bool:
    return any(c.__name__ == class_name for c in type(obj).__mro__)


def transformers_of(model, class_name: str) -> list:
    """The transformer itself, or the pipeline's ``transformer`` (and Wan 2.2's ``transformer_2``) of that class."""
    if is_class(model, class_name):
        return [model]
    found = [getattr(model, name, None) for name in ("transformer", "transformer_2")]
    return [t for t in found if t is not None and is_class(t, class_name)]


def wan_layers(transformer):
    return [(i, block.attn1) for i, block in enumerate(transformer.blocks)]


def hunyuan_layers(transformer):
    double = [block.attn for block in transformer.transformer_blocks]
    single = [block.attn for block in transformer.single_transformer_blocks]
    return list(enumerate(double + single))


def to_heads(x: torch.Tensor) -> torch.Tensor:
    """diffusers' (B, N, H, D) -> (B*H, N, D)."""
    b, n, h, d = x.shape
    return x.transpose(1, 2).reshape(b * h, n, d)


def from_heads(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B*H, N, D) -> (B, N, H*D)."""
    bh, n, d = x.shape
    return x.view(batch, bh // batch, n, d).transpose(1, 2).reshape(batch, n, -1)


def wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on interleaved pairs, the same operations as ``WanAttnProcessor``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def wan_qkv(attn, hidden_states: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, ...]:
    """Self-attention Q, K, V (B, N, H, D) after QK-norm and RoPE, as ``WanAttnProcessor`` computes them."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query, key = attn.norm_q(query), attn.norm_k(key)
    query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
    if rotary_emb is not None:
        query, key = wan_rotary(query, *rotary_emb), wan_rotary(key, *rotary_emb)
    return query, key, value


def hunyuan_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """Joint [video | text] Q, K, V (B, N, H, D), as ``HunyuanVideoAttnProcessor2_0`` computes them."""
    apply_rotary_emb = _compat.diffusers_apply_rotary_emb()
    n_text = encoder_hidden_states.shape[1]
    single_stream = attn.add_q_proj is None
    if single_stream:
        hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    query, key, value = (p(hidden_states).unflatten(2, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if image_rotary_emb is not None:
        n_rope = query.shape[1] - n_text if single_stream else query.shape[1]  # RoPE on the video tokens only
        query, key = (torch.cat([apply_rotary_emb(t[:, :n_rope], image_rotary_emb, sequence_dim=1), t[:, n_rope:]], 1)
                      for t in (query, key))
    if not single_stream:
        text = [proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
        if attn.norm_added_q is not None:
            text[0] = attn.norm_added_q(text[0])
        if attn.norm_added_k is not None:
            text[1] = attn.norm_added_k(text[1])
        query, key, value = (torch.cat([a, b], dim=1) for a, b in zip((query, key, value), text, strict=True))
    return query, key, value


register_host("wan", "diffusers WanTransformer3DModel (Wan 2.1 / 2.2), or a Wan pipeline (its .transformer / "
              ".transformer_2)", matches=lambda model: bool(transformers_of(model, WAN)), installers={})
register_host("hunyuan_video", "diffusers HunyuanVideoTransformer3DModel, or a HunyuanVideo pipeline (its "
              ".transformer)", matches=lambda model: bool(transformers_of(model, HUNYUAN)), installers={})

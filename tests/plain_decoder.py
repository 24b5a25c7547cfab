"""A tiny LLaVA's decoder run layer by layer, by hand: what the plain re-implementations of the in-LLM methods' release
loops (TransPrune, PyramidDrop, DART) build on. One sample, no padding, eager arithmetic, original RoPE positions."""

from __future__ import annotations

import torch
from tiny_models import prompt, tiny_llava


def one_image_prompt(attn: str) -> tuple:
    """A tiny LLaVA (``attn`` in its decoder) and one 64-token image with a six-token question after it."""
    model = tiny_llava(attn)
    torch.manual_seed(3)
    ids = prompt(64, after=(7, 8, 9, 10, 11, 12)).unsqueeze(0)
    return model, dict(input_ids=ids, pixel_values=torch.randn(1, 3, 112, 112), attention_mask=torch.ones_like(ids))


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return torch.cat([-t[..., half:], t[..., :half]], -1)


def decoder_input(model, inputs: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(hidden states entering decoder layer 0, its RoPE (cos, sin)) for ``inputs`` on the unpatched ``model``."""
    seen = {}

    def grab(module, args, kwargs):
        seen.update(hidden=args[0] if args else kwargs["hidden_states"], rope=kwargs["position_embeddings"])

    hook = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    return seen["hidden"], seen["rope"]


def keys(layer, hidden: torch.Tensor) -> torch.Tensor:
    """(1, H_kv, n, d) the layer's key states before RoPE."""
    attn = layer.self_attn
    u = layer.input_layernorm(hidden)
    return attn.k_proj(u).view(1, u.shape[1], -1, attn.head_dim).transpose(1, 2)


def attention(layer, hidden: torch.Tensor, alive: torch.Tensor, rope) -> torch.Tensor:
    """(n, n) the layer's causal softmax attention on ``hidden`` (rows alive at ``alive``), averaged over heads."""
    attn = layer.self_attn
    cos, sin = rope
    u = layer.input_layernorm(hidden)
    n, hd = u.shape[1], attn.head_dim
    q = attn.q_proj(u).view(1, n, -1, hd).transpose(1, 2)
    k = keys(layer, hidden)
    c, s = cos[:, alive][:, None], sin[:, alive][:, None]
    q, k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)) * attn.scaling
    logits = logits.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))
    return logits.softmax(-1).mean(1)[0]


def run_layer(layer, hidden: torch.Tensor, alive: torch.Tensor, rope) -> torch.Tensor:
    """The layer on the rows alive at ``alive`` (their original positions), causal among them."""
    cos, sin = rope
    n = hidden.shape[1]
    causal = torch.zeros(1, 1, n, n).masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)),
                                                 torch.finfo(torch.float32).min)
    with torch.no_grad():
        out = layer(hidden, attention_mask=causal, position_ids=alive[None],
                    position_embeddings=(cos[:, alive], sin[:, alive]))
    return out[0] if isinstance(out, tuple) else out


def last_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    lm = model.model.language_model
    with torch.no_grad():
        return model.lm_head(lm.norm(hidden))[:, -1]

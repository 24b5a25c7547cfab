"""Tiny random-weight VLMs built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import inspect

import torch
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)

IMAGE_TOKEN = 99
PAD, BOS, EOS = 0, 1, 2
VOCAB = 100


def cache_keyword(model) -> str:
    """The keyword that passes a KV cache to ``generate()`` / ``forward`` (``cache`` from transformers 5.24 on)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def text_config(layers: int = 4) -> dict:
    return dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)


def vision_config(image_size: int, layers: int = 2) -> dict:
    return dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, image_size=image_size, patch_size=14)


def tiny_llava(attn: str = "sdpa", layers: int = 4, image_size: int = 112, strategy: str = "default",
               vision_layers: int = 2):
    """LLaVA-1.5-shaped: (112 / 14)^2 = 64 visual tokens per image."""
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=vision_config(image_size, vision_layers), text_config=text_config(layers),
                      image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                      vision_feature_select_strategy=strategy)
    return LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()


def tiny_llava_next(attn: str = "sdpa", layers: int = 4):
    torch.manual_seed(0)
    cfg = LlavaNextConfig(vision_config=vision_config(56), text_config=text_config(layers),
                          image_token_id=IMAGE_TOKEN,
                          image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]])
    return LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()


VIDEO_TOKEN = 98
ONEVISION_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [112, 168], [168, 112], [168, 168]]


def tiny_llava_onevision(attn: str = "sdpa", layers: int = 4):
    """LLaVA-OneVision-shaped: a SigLIP tower (no [CLS]) on 56 px tiles (4 x 4 patches), a Qwen2 decoder, and
    ``anyres_max_2`` so that a large image's grid is scaled down, as ``anyres_max_9`` does to real ones."""
    torch.manual_seed(0)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=56, patch_size=14, vision_use_head=False)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=dict(text_config(layers), model_type="qwen2"),
                               image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                               image_grid_pinpoints=ONEVISION_PINPOINTS, vision_aspect_ratio="anyres_max_2")
    return LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()


def tiny_internvl(attn: str = "sdpa", layers: int = 4):
    """InternVL3-shaped: an InternViT-like tower with [CLS] on 112 px views (8 x 8 patches), pixel-shuffled to 4 x 4 =
    16 tokens per view, a Qwen2 decoder."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=[112, 112], patch_size=[14, 14])
    # untied embeddings: tied ones make a tiny random decoder repeat its last token, whatever it sees
    cfg = InternVLConfig(vision_config=vision, text_config=dict(text_config(layers), model_type="qwen2",
                                                                tie_word_embeddings=False),
                         image_token_id=IMAGE_TOKEN, downsample_ratio=0.5, tie_word_embeddings=False)
    return InternVLForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()


def visual_count(model, pixel_values, image_sizes=None) -> list[int]:
    kwargs = {"image_sizes": image_sizes} if image_sizes is not None else {}
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixel_values, return_dict=True, **kwargs)
    return [f.shape[0] for f in out.pooler_output]


def prompt(n_image: int, before=(BOS, 5, 6), after=(7, 8, 9, 10)) -> torch.Tensor:
    return torch.tensor([*before, *([IMAGE_TOKEN] * n_image), *after])


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def hooks_of(model) -> dict:
    """Every module's forward / pre-forward hook ids: remove() must bring this back exactly (transformers installs
    output-recording hooks of its own on first use, so compare with a snapshot rather than with nothing)."""
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}


# -- Qwen2-VL / Qwen2.5-VL / Qwen3-VL ------------------------------------------------------------------------------
QWEN_IMAGE, QWEN_VIDEO, VISION_START, VISION_END = 91, 92, 93, 94
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def tiny_qwen(family: str = "qwen2_5_vl", attn: str = "sdpa", layers: int = 4, sliding_window: int | None = None):
    """A tiny Qwen-VL from a config: 14 px patches (16 for Qwen3-VL), 2x2 merger, M-RoPE sections summing to
    head_dim / 2 = 8; ``sliding_window``: layers after the first attend within that window (Qwen2's option)."""
    import transformers

    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                max_position_embeddings=512, rope_parameters=rope)
    if sliding_window is not None:
        text = dict(text, use_sliding_window=True, sliding_window=sliding_window, max_window_layers=1)
    ids = dict(image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)
    common = dict(depth=2, num_heads=4, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=dict(
            **common, patch_size=14, embed_dim=32, hidden_size=64, mlp_ratio=2), **ids)
        cls = transformers.Qwen2VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            **common, patch_size=14, hidden_size=32, out_hidden_size=64, intermediate_size=64, window_size=56,
            fullatt_block_indexes=[1]), **ids)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        text = dict(text, head_dim=16, rope_parameters=dict(rope, mrope_interleaved=True))
        cfg = transformers.Qwen3VLConfig(text_config=text, vision_config=dict(
            **common, patch_size=16, hidden_size=32, out_hidden_size=64, intermediate_size=64,
            num_position_embeddings=64, deepstack_visual_indexes=[0, 1]), **ids)
        cls = transformers.Qwen3VLForConditionalGeneration
    torch.manual_seed(0)
    return cls._from_config(cfg, attn_implementation=attn).eval()


def qwen_pixels(model, t: int, h: int, w: int) -> torch.Tensor:
    """Flattened patches for a (t, h, w) patch grid (t counts temporal patches of 2 frames)."""
    vc = model.config.vision_config
    return torch.randn(t * h * w, 3 * vc.temporal_patch_size * vc.patch_size ** 2)


def qwen_prompt(items: list[tuple[str, int]], before=(BOS, 5), after=(7, 8, 9), frames: int = 1) -> torch.Tensor:
    """Text, then per item a vision-start, its placeholders and a vision-end, then more text. Qwen3-VL writes a
    video as ``frames`` such groups, each after a timestamp token (pass its temporal patch count)."""
    row = list(before)
    for kind, n in items:
        if kind == "image":
            row += [VISION_START, *([QWEN_IMAGE] * n), VISION_END]
            continue
        for _ in range(frames):
            row += ([6] if frames > 1 else []) + [VISION_START, *([QWEN_VIDEO] * (n // frames)), VISION_END]
    return torch.tensor(row + list(after))


def qwen_token_types(ids: torch.Tensor) -> torch.Tensor:
    return (ids == QWEN_IMAGE).int() + 2 * (ids == QWEN_VIDEO).int()

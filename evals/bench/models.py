"""Built-in model shapes for benchmarks (random weights: speed does not depend on them) and synthetic inputs."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from vtoken.adapters import _compat

CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
VICUNA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)


QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                     fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
QWEN25_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                   rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
# LLaVA-OneVision-7B: SigLIP-so400m/14 at 384 px (27 x 27 = 729 tokens per view, no [CLS]) + Qwen2-7B
SIGLIP_SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                     num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
QWEN2_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, vocab_size=152128, max_position_embeddings=32768,
                rms_norm_eps=1e-6, rope_theta=1e6, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ONEVISION_IDS = dict(image_token_id=151646, video_token_id=151647)
# InternVL3-8B: InternViT-300M at 448 px ([CLS] + 32 x 32 patches, pixel-shuffled to 16 x 16 = 256 tokens per tile)
# + Qwen2.5-7B; the benchmark's image is 6 tiles and the thumbnail (1,792 tokens)
INTERNVIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=[448, 448], patch_size=[14, 14])
QWEN25_7B = dict(QWEN2_7B, vocab_size=151674)
INTERNVL_TILES = 7
# The CPU presets' reduced tower (LLaVA-1.5, OneVision, InternVL shapes) and reduced Qwen2 LLM (OneVision, InternVL)
REDUCED_TOWER = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=7, num_attention_heads=3)
REDUCED_QWEN2 = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=7, num_attention_heads=7,
                     num_key_value_heads=1, vocab_size=32000)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                vision_end_token_id=151653)


@dataclass(frozen=True)
class Preset:
    description: str
    config: dict


PRESETS: dict[str, Preset] = {
    # LLaVA-1.5-7B proportions at a CPU-friendly size: the same 336 px / patch-14 tower geometry (576 visual
    # tokens), a narrower, shallower tower and LLM, and an LLM prefill that costs ~25x the tower (7B: ~22x).
    "tiny-llava-1.5": Preset(
        "LLaVA-1.5-shaped, 576 visual tokens, reduced width/depth (random weights)",
        dict(kind="llava",
             vision_config=dict(CLIP_L_336, **REDUCED_TOWER),
             text_config=dict(VICUNA_7B, hidden_size=1024, intermediate_size=2752, num_hidden_layers=8,
                              num_attention_heads=8, num_key_value_heads=8),
             image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default"),
    ),
    "llava-1.5-7b": Preset(
        "LLaVA-1.5-7B shape: CLIP ViT-L/14-336 + Vicuna-7B (random weights)",
        dict(kind="llava", vision_config=CLIP_L_336, text_config=VICUNA_7B, image_token_id=32000,
             vision_feature_layer=-2, vision_feature_select_strategy="default"),
    ),
    "llava-next-7b": Preset(
        "LLaVA-NeXT-7B shape: AnyRes up to 672x672 (5 crops, 2,928 visual tokens), Vicuna-7B (random weights)",
        dict(kind="llava_next", vision_config=CLIP_L_336, text_config=VICUNA_7B, image_token_id=32000,
             vision_feature_layer=-2, vision_feature_select_strategy="default",
             image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
    ),
    # Qwen2.5-VL-7B proportions at a CPU-friendly size: the same 14 px patches, 2x2 merger and 112 px attention
    # windows (full attention in every 4th block), a quarter of the width and depth in the tower and the LLM
    # (the vision encoder stays about a quarter of prefill on a 448x448 image), GQA 7:1 as in the 7B.
    "tiny-qwen2.5-vl": Preset(
        "Qwen2.5-VL-7B-shaped: 448x448 image -> 256 merged tokens (or an 8-frame video), reduced width/depth "
        "(random weights)",
        dict(kind="qwen2_5_vl",
             vision_config=dict(QWEN25_VISION, depth=8, hidden_size=320, intermediate_size=856, num_heads=4,
                                out_hidden_size=896, fullatt_block_indexes=[1, 3, 5, 7]),
             text_config=dict(QWEN25_TEXT, hidden_size=896, intermediate_size=4736, num_hidden_layers=7,
                              num_attention_heads=7, num_key_value_heads=1, vocab_size=32000),
             image_token_id=31995, video_token_id=31996, vision_start_token_id=31997, vision_end_token_id=31998),
    ),
    "qwen2.5-vl-7b": Preset(
        "Qwen2.5-VL-7B shape: 448x448 image -> 256 merged tokens (or an 8-frame video) (random weights)",
        dict(kind="qwen2_5_vl", vision_config=QWEN25_VISION, text_config=QWEN25_TEXT, **QWEN_IDS),
    ),
    "llava-onevision-7b": Preset(
        "LLaVA-OneVision-7B shape: SigLIP 384 px, AnyRes (a 768x768 image: 5 views, 3,699 visual tokens; or an "
        "8-frame video, 1,569 tokens), Qwen2-7B (random weights)",
        dict(kind="llava_onevision", vision_config=SIGLIP_SO400M, text_config=QWEN2_7B, **ONEVISION_IDS),
    ),
    "tiny-llava-onevision": Preset(
        "LLaVA-OneVision-7B-shaped: the same 384 px views and AnyRes layout, reduced width/depth (random weights)",
        dict(kind="llava_onevision",
             vision_config=dict(SIGLIP_SO400M, **REDUCED_TOWER), text_config=dict(QWEN2_7B, **REDUCED_QWEN2),
             image_token_id=31998, video_token_id=31999),
    ),
    "internvl3-8b": Preset(
        "InternVL3-8B shape: InternViT-300M at 448 px, an image of 6 tiles + thumbnail (1,792 visual tokens), "
        "Qwen2.5-7B (random weights)",
        dict(kind="internvl", vision_config=INTERNVIT_300M, text_config=QWEN25_7B, image_token_id=151667,
             downsample_ratio=0.5),
    ),
    "tiny-internvl3": Preset(
        "InternVL3-8B-shaped: the same 448 px tiles (7 per image), reduced width/depth (random weights)",
        dict(kind="internvl",
             vision_config=dict(INTERNVIT_300M, **REDUCED_TOWER), text_config=dict(QWEN25_7B, **REDUCED_QWEN2),
             image_token_id=31999, downsample_ratio=0.5),
    ),
    # Full depth and geometry, tiny width: for counting ops and syncs (vtoken overhead), which depend on the number of
    # layers and tokens, not on their width. LLaVA-1.5 and -NeXT: Vicuna-7B's 32 decoder layers; Qwen2.5-VL: 28.
    "count-llava-1.5": Preset(
        "LLaVA-1.5-7B geometry (576 visual tokens, 32 decoder layers) at a tiny width (random weights)",
        dict(kind="llava", vision_config=dict(CLIP_L_336, **TINY_VISION), text_config=dict(VICUNA_7B, **TINY_TEXT),
             image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default"),
    ),
    "count-llava-next": Preset(
        "LLaVA-NeXT-7B geometry (up to 2,928 visual tokens, 32 decoder layers) at a tiny width (random weights)",
        dict(kind="llava_next", vision_config=dict(CLIP_L_336, **TINY_VISION),
             text_config=dict(VICUNA_7B, **TINY_TEXT), image_token_id=32000, vision_feature_layer=-2,
             vision_feature_select_strategy="default",
             image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
    ),
    "count-qwen2.5-vl": Preset(
        "Qwen2.5-VL-7B geometry (256 merged tokens from 448x448, 28 decoder layers) at a tiny width (random weights)",
        dict(kind="qwen2_5_vl",
             vision_config=dict(QWEN25_VISION, depth=4, hidden_size=32, intermediate_size=64, num_heads=2,
                                out_hidden_size=64, fullatt_block_indexes=[1, 3]),
             text_config=dict(QWEN25_TEXT, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=32000,
                              rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                               "rope_theta": 1e6}),
             image_token_id=31995, video_token_id=31996, vision_start_token_id=31997, vision_end_token_id=31998),
    ),
}
# A LLaVA-1.5 conversation prompt: ~40 tokens of system prompt and "USER:" before the image, ~24 after.
TEXT_BEFORE, TEXT_AFTER = 40, 24
QWEN_IMAGE_SIDE, VIDEO_FRAMES = 448, 8


def add_model_arguments(parser: argparse.ArgumentParser, default: str, families: str) -> None:
    """``--model`` (a preset or a hub id / local path of one of ``families``) and ``--random-weights``."""
    parser.add_argument("--model", default=default,
                        help=f"a preset ({', '.join(PRESETS)}) or an HF {families} id or local path")
    parser.add_argument("--random-weights", action="store_true", help="build --model from its config only")


def check_model(name: str) -> None:
    """Fail fast, naming the presets, on a ``--model`` that is no preset, no local LLaVA checkpoint and no hub id
    that can be reached; otherwise the hub's own error would say something about repo-id syntax."""
    if name in PRESETS:
        return
    from huggingface_hub import is_offline_mode

    choices = (f"use a built-in preset ({', '.join(PRESETS)}), a local LLaVA / LLaVA-NeXT checkpoint folder, or a hub "
               "id such as llava-hf/llava-1.5-7b-hf")
    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"--model {name}: no config.json in this folder; {choices}")
    if not path.exists():
        if name.startswith(("/", ".", "~")) or name.count("/") > 1:
            raise ValueError(f"--model {name}: no such folder; {choices}")
        if is_offline_mode():
            raise ValueError(f"--model {name}: not a preset or a local folder, and the hub is offline "
                             f"(HF_HUB_OFFLINE); {choices}")
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as error:
        raise ValueError(f"--model {name}: {error}; {choices}") from None
    _model_class(config)


def build_model(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", attn: str = "sdpa",
                random_weights: bool = False):
    """A preset name, or an HF id / local path (``random_weights`` builds it from its config alone).

    Random weights are drawn on ``device`` itself: a 7B model initialised on the CPU and then moved takes minutes.
    """
    torch.manual_seed(0)
    if name in PRESETS:
        spec = dict(PRESETS[name].config)
        kind = spec.pop("kind")
        config = AutoConfig.for_model(kind, **spec)
        cls = _model_class(config)
        with torch.device(device):
            model = cls._from_config(config, attn_implementation=attn, dtype=dtype)
    else:
        config = AutoConfig.from_pretrained(name)
        cls = _model_class(config)
        if random_weights:
            with torch.device(device):
                model = cls._from_config(config, attn_implementation=attn, dtype=dtype)
        else:
            model = cls.from_pretrained(name, attn_implementation=attn, dtype=dtype)
    return model.to(device).eval()


MODEL_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                 "llava_onevision": "LlavaOnevisionForConditionalGeneration",
                 "internvl": "InternVLForConditionalGeneration",
                 "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "qwen3_vl": "Qwen3VLForConditionalGeneration"}


def _model_class(config):
    import transformers

    if config.model_type in MODEL_CLASSES:
        return getattr(transformers, MODEL_CLASSES[config.model_type])
    raise ValueError(f"--model: {config.model_type!r} models are not supported by the benchmark; use a LLaVA, "
                     f"LLaVA-NeXT, LLaVA-OneVision, InternVL or Qwen-VL checkpoint or one of the presets: "
                     f"{', '.join(PRESETS)}")


def is_qwen(model) -> bool:
    return model.config.model_type.startswith("qwen")


def qwen_inputs(model, batch: int, video: bool, g: torch.Generator) -> dict:
    """A 448x448 image (or an 8-frame video of 448x448 frames) and a chat-length prompt for a Qwen-VL model."""
    cfg, vc = model.config, model.config.vision_config
    side = QWEN_IMAGE_SIDE // vc.patch_size
    t = VIDEO_FRAMES // vc.temporal_patch_size if video else 1
    grid = torch.tensor([[t, side, side]] * batch)
    pixels = torch.randn(batch * t * side * side, 3 * vc.temporal_patch_size * vc.patch_size**2, generator=g)
    token = cfg.video_token_id if video else cfg.image_token_id
    n = t * side * side // vc.spatial_merge_size**2
    text = torch.randint(3, min(cfg.text_config.vocab_size, 31000), (batch, TEXT_BEFORE + TEXT_AFTER), generator=g)
    specials = torch.tensor([cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                             cfg.vision_end_token_id])
    text = torch.where(torch.isin(text, specials), 3, text)  # text never holds a vision token
    ids = torch.cat([torch.full((batch, 1), cfg.text_config.bos_token_id or 1), text[:, :TEXT_BEFORE],
                     torch.full((batch, 1), cfg.vision_start_token_id), torch.full((batch, n), token),
                     torch.full((batch, 1), cfg.vision_end_token_id), text[:, TEXT_BEFORE:]], dim=1)
    kind = "video" if video else "image"
    device = model.device
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "mm_token_type_ids": ((ids == token).int() * (2 if video else 1)).to(device),
            ("pixel_values_videos" if video else "pixel_values"): pixels.to(device, model.dtype),
            f"{kind}_grid_thw": grid.to(device)}


def synthetic_inputs(model, batch: int = 1, seed: int = 0, video: bool = False) -> dict:
    """Random image(s) (Qwen-VL, LLaVA-OneVision: or 8-frame videos) and a chat-length prompt with the right number
    of placeholders."""
    g = torch.Generator().manual_seed(seed)
    if is_qwen(model):
        return qwen_inputs(model, batch, video, g)
    if video and model.config.model_type != "llava_onevision":
        raise ValueError("--video: only Qwen-VL and LLaVA-OneVision models take videos")
    cfg = model.config
    size = _compat.square_size(cfg.vision_config.image_size)
    device, dtype = model.device, model.dtype
    extra = {}
    if video:
        pixels = torch.randn(batch, VIDEO_FRAMES, 3, size, size, generator=g).to(device, dtype)
        with torch.no_grad():
            n_image = model.model.get_video_features(pixel_values_videos=pixels[:1],
                                                     return_dict=True).pooler_output.shape[1]
        token = cfg.video_token_id
        extra["pixel_values_videos"] = pixels
    else:
        if cfg.model_type in ("llava_next", "llava_onevision"):
            from vtoken.adapters.llava import anyres_views

            if cfg.model_type == "llava_next":
                image_size = max(cfg.image_grid_pinpoints, key=lambda hw: hw[0] * hw[1])
            else:
                image_size = [2 * size, 2 * size]  # 2 x 2 tiles and the base view (768 x 768 at 384 px)
            views = anyres_views(image_size, cfg.image_grid_pinpoints, size)
            pixels = torch.randn(batch, views, 3, size, size, generator=g)
            extra["image_sizes"] = torch.tensor([image_size] * batch, device=device)
        elif cfg.model_type == "internvl":  # the tiles of every image, one after the other
            pixels = torch.randn(batch * INTERNVL_TILES, 3, size, size, generator=g)
        else:
            pixels = torch.randn(batch, 3, size, size, generator=g)
        extra["pixel_values"] = pixels = pixels.to(device, dtype)
        one = {k: v[: INTERNVL_TILES if cfg.model_type == "internvl" else 1] for k, v in extra.items()}
        with torch.no_grad():
            feats = model.model.get_image_features(return_dict=True, **one)
        n_image = sum(f.shape[0] for f in feats.pooler_output)
        token = cfg.image_token_id
    vocab = cfg.text_config.vocab_size
    low = 3
    specials = [t for t in (cfg.image_token_id, getattr(cfg, "video_token_id", None)) if t is not None and t > low]
    high = min([vocab, *specials])
    text = torch.randint(low, high, (batch, TEXT_BEFORE + TEXT_AFTER), generator=g)
    image = torch.full((batch, n_image), token)
    bos = torch.full((batch, 1), cfg.text_config.bos_token_id or 1)
    ids = torch.cat([bos, text[:, :TEXT_BEFORE], image, text[:, TEXT_BEFORE:]], dim=1).to(device)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)



def views_per_sample(inputs: dict) -> int:
    """Tower passes per prompt: AnyRes views or InternVL tiles of an image, or frames of a video."""
    pixels = inputs.get("pixel_values")
    if pixels is not None and pixels.dim() == 4 and pixels.shape[0] > inputs["input_ids"].shape[0]:  # InternVL tiles
        return pixels.shape[0] // inputs["input_ids"].shape[0]
    if pixels is None:
        pixels = inputs.get("pixel_values_videos")
    return pixels.shape[1] if pixels is not None and pixels.dim() == 5 else 1

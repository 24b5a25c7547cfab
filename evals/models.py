"""Built-in model shapes for benchmarks (random weights: speed does not depend on them) and synthetic inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig

CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
VICUNA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)


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
             vision_config=dict(CLIP_L_336, hidden_size=192, intermediate_size=768, num_hidden_layers=7,
                                num_attention_heads=3),
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
}
# A LLaVA-1.5 conversation prompt: ~40 tokens of system prompt and "USER:" before the image, ~24 after.
TEXT_BEFORE, TEXT_AFTER = 40, 24


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
        config = (LlavaConfig if kind == "llava" else LlavaNextConfig)(**spec)
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


def _model_class(config):
    from transformers import LlavaNextForConditionalGeneration

    if config.model_type == "llava":
        return LlavaForConditionalGeneration
    if config.model_type == "llava_next":
        return LlavaNextForConditionalGeneration
    raise ValueError(f"--model: {config.model_type!r} models are not supported by the benchmark; use a LLaVA or "
                     f"LLaVA-NeXT checkpoint or one of the presets: {', '.join(PRESETS)}")


def synthetic_inputs(model, batch: int = 1, seed: int = 0) -> dict:
    """Random image(s) and a LLaVA-length prompt with the right number of image placeholders."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    size = cfg.vision_config.image_size
    device, dtype = model.device, model.dtype
    extra = {}
    if cfg.model_type == "llava_next":
        from vtoken.adapters.llava import anyres_views

        image_size = max(cfg.image_grid_pinpoints, key=lambda hw: hw[0] * hw[1])
        views = anyres_views(image_size, cfg.image_grid_pinpoints, size)
        pixels = torch.randn(batch, views, 3, size, size, generator=g)
        extra["image_sizes"] = torch.tensor([image_size] * batch, device=device)
    else:
        pixels = torch.randn(batch, 3, size, size, generator=g)
    pixels = pixels.to(device, dtype)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels[:1], return_dict=True, **{
            k: v[:1] for k, v in extra.items()})
    n_image = feats.pooler_output[0].shape[0]
    vocab = cfg.text_config.vocab_size
    low = 3
    high = min(vocab, cfg.image_token_id) if cfg.image_token_id > low else vocab
    text = torch.randint(low, high, (batch, TEXT_BEFORE + TEXT_AFTER), generator=g)
    image = torch.full((batch, n_image), cfg.image_token_id)
    bos = torch.full((batch, 1), cfg.text_config.bos_token_id or 1)
    ids = torch.cat([bos, text[:, :TEXT_BEFORE], image, text[:, TEXT_BEFORE:]], dim=1).to(device)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, **extra)


def views_per_sample(inputs: dict) -> int:
    pixels = inputs["pixel_values"]
    return pixels.shape[1] if pixels.dim() == 5 else 1

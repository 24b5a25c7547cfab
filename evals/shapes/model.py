"""The ShapesVQA model family: a small HF LLaVA (CLIP-shaped vision tower + Llama decoder), a word-level
tokenizer and a LlavaProcessor, all built offline from configs and saved with ``save_pretrained``.

``load_task_model()`` loads the checkpoint shipped for a task (``evals/shapes/assets/shapes_llava`` for
ShapesVQA, ``shapes_hard_llava`` for ShapesVQA-Hard, both trained by ``vtoken train-shapes``); ``build_*`` make
fresh, untrained ones for training and tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from vtoken.evals.shapes import data as shapes_data
from vtoken.evals.shapes import hard as shapes_hard
from vtoken.evals.shapes.data import IMAGE_SIZE, vocabulary

ASSET_DIR = Path(__file__).parent / "assets" / "shapes_llava"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
# The prompt format the model was trained on; lmms-eval's llava_hf builds prompts through this template.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Architecture of the shipped model (sizes chosen to train on 2 CPU cores in about half an hour).
VISION = dict(
    model_type="clip_vision_model", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
    num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=16,
)
TEXT = dict(
    model_type="llama", hidden_size=160, intermediate_size=448, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
)


@dataclass(frozen=True)
class Task:
    """A ShapesVQA task and the model shipped for it.

    ``data`` is the task's data module (``random_scene``, ``render``, ``patch_targets``, ``PATCH_TARGETS``,
    ``TARGET_CLASSES``, ``scene_questions``, ``make_split``, ``vocabulary``, ``SPLIT_SEEDS``). ``attention_targets``:
    the model was taught where to look (ShapesVQA: a tower head that counts, the decoder's lookup heads); the hard
    task's model learned every attention map from its losses alone. ``text``: decoder sizes over ``TEXT``."""

    title: str
    data: ModuleType
    checkpoint: Path
    attention_targets: bool
    text: dict


TASKS = {
    "shapes": Task("ShapesVQA", shapes_data, ASSET_DIR, True, {}),
    # wider, with more heads: with no attention targets the decoder must find the named shape's tokens itself
    "hard": Task("ShapesVQA-Hard", shapes_hard, ASSET_DIR.with_name("shapes_hard_llava"), False,
                 dict(hidden_size=192, intermediate_size=512, num_attention_heads=6, num_key_value_heads=6)),
}


def build_tokenizer(words: list[str] | None = None):
    """Word-level tokenizer over ``words`` (default: the ShapesVQA vocabulary); BOS is prepended, unknown words map
    to <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for word in words or vocabulary():
        vocab.setdefault(word, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs; "\n" is plain whitespace
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left", model_max_length=512,
    )


def build_processor(words: list[str] | None = None):
    """LlavaProcessor that expands ``<image>`` into one placeholder per patch (224/16 squared = 196); ``words`` is
    the tokenizer's vocabulary (default: ShapesVQA's)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(words), patch_size=VISION["patch_size"],
        vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer, vision: dict | None = None, text: dict | None = None):
    from transformers import LlavaConfig

    vision = {**VISION, **(vision or {})}
    text = {
        **TEXT, **(text or {}), "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
    }
    n_patches = (vision["image_size"] // vision["patch_size"]) ** 2
    # vision_feature_layer=-1: with LLaVA's usual -2 the last CLIP layer would get no gradient and stay random.
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=n_patches,
        projector_hidden_act="gelu", tie_word_embeddings=text["tie_word_embeddings"],
    )


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """(side*side, dim) fixed 2-D sine-cosine position codes (as in MAE): half the channels encode the row,
    half the column, each at geometrically spaced frequencies."""
    quarter = dim // 4
    freq = 1.0 / 100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    pos = torch.arange(side, dtype=torch.float32)
    rows, cols = pos.repeat_interleave(side), pos.repeat(side)
    codes = [f(p[:, None] * freq) for p in (rows, cols) for f in (torch.sin, torch.cos)]
    out = torch.zeros(side * side, dim)
    out[:, : 4 * quarter] = torch.cat(codes, dim=1)
    return out


def build_model(processor, vision: dict | None = None, text: dict | None = None, seed: int = 0,
                position_scale: float = 1.0):
    """A freshly initialised model matching ``processor`` (its image-token count and vocabulary).

    The vision tower's position embeddings start as 2-D sine-cosine codes times ``position_scale`` (still
    trainable) instead of CLIP's N(0, 0.02): a from-scratch tower then knows where each patch is from step one,
    which the spatial questions need and which the LLM can read without relying on a token's index in the
    sequence. At 1.0 their norm is close to the patch embeddings' at initialisation; at 0.15 the tower never
    learned where a patch is."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    config = build_config(processor.tokenizer, vision, text)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    vc = config.vision_config
    with torch.no_grad():
        table = model.model.vision_tower.embeddings.position_embedding.weight  # row 0 is [CLS]
        table[0].zero_()
        table[1:] = position_scale * sincos_2d(vc.image_size // vc.patch_size, vc.hidden_size)
    tok = processor.tokenizer
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=4, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return model


def num_visual_tokens(model) -> int:
    vc = model.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


def load_shapes_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32,
                      attn_implementation: str = "sdpa"):
    """``(model, processor)`` of the shipped ShapesVQA checkpoint (or one saved at ``path``), in eval mode."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    path = Path(path) if path is not None else ASSET_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no ShapesVQA checkpoint at {path}; train one with `python -m vtoken.evals.shapes.training --out DIR`"
        )
    processor = LlavaProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval(), processor


def load_task_model(task: str, path: str | Path | None = None):
    """``(model, processor)`` for ``TASKS[task]``: the checkpoint shipped for it, or one at ``path`` whose tokenizer
    knows every word of the task (a model trained on the other task would read the unknown words as <unk>)."""
    path = TASKS[task].checkpoint if path is None else path
    model, processor = load_shapes_model(path)
    check_vocabulary(processor, task, f"the checkpoint at {path}")
    return model, processor


def check_vocabulary(processor, task: str, what: str) -> None:
    known = processor.tokenizer.get_vocab()
    missing = [w for w in TASKS[task].data.vocabulary() if w not in known]
    if missing:
        raise ValueError(f"{what} was not trained on the {TASKS[task].title} task (--task {task}): its tokenizer "
                         f"lacks {', '.join(missing[:4])}")

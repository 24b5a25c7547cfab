"""ShapesVQA's reference for a boundary reduction: the shortened input built by hand as ``inputs_embeds``, which a
patched model's ``generate()`` must equal."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from vtoken.adapters._compat import clip_parts
from vtoken.adapters.vlm.tower import cls_attention as llava_cls_attention
from vtoken.evals.shapes.data import Example
from vtoken.evals.shapes.evaluate import ShapesResult, batches, prompt_inputs, score
from vtoken.evals.shapes.model import num_visual_tokens
from vtoken.methods.base import GridSegment, ImageContext, Reduction

# A reducer gets one image's projected visual tokens (n, D) and an ImageContext (patch grid, lazily computed
# [CLS] attention) and returns fewer rows, or a Reduction: a boundary method's ``reduce`` is a reducer.
Reducer = Callable[[torch.Tensor, ImageContext], "torch.Tensor | Reduction"]


def cls_attention(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, n_patches) head-averaged [CLS]->patch attention of the vision tower's last layer, recomputed from
    that layer's input, so it works with any attention implementation."""
    tower = model.model.vision_tower
    hidden = tower(pixel_values, output_hidden_states=True).hidden_states[-2]
    return llava_cls_attention(clip_parts(tower)[1][-1], hidden)[:, 1:]


def shortened_embeddings(model, input_ids: torch.Tensor, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per sample: the prompt's embeddings with its run of image placeholders replaced by ``features[i]``
    (any length), i.e. the sequence a boundary method should hand to the LLM. Padding is removed."""
    embed = model.get_input_embeddings()
    image_id = model.config.image_token_id
    out = []
    for ids, feats in zip(input_ids, features):
        ids = ids[ids != model.config.text_config.pad_token_id]
        placeholder = (ids == image_id).nonzero().flatten()
        first, last = int(placeholder[0]), int(placeholder[-1]) + 1
        if last - first != len(placeholder):
            raise ValueError("expected one contiguous run of image placeholders per prompt")
        text = embed(ids)
        out.append(torch.cat([text[:first], feats.to(text.dtype), text[last:]]))
    return out


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (L_i, D) rows into (B, L, D) with zeros on the left, plus the (B, L) attention mask."""
    length = max(r.shape[0] for r in rows)
    embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        embeds[i, length - r.shape[0] :] = r
        mask[i, length - r.shape[0] :] = 1
    return embeds, mask


@torch.no_grad()
def evaluate_reduced(model, processor, examples: Sequence[Example], reducer: Reducer, batch_size: int = 32,
                     max_new_tokens: int = 3, progress: bool = True, desc: str = "ShapesVQA reduced") -> ShapesResult:
    """Like ``evaluate``, but each image's projected tokens pass through ``reducer`` and the LLM sees the
    shortened prompt (placeholders dropped, positions contiguous), built by hand as ``inputs_embeds``."""
    tokenizer = processor.tokenizer
    n = num_visual_tokens(model)
    side = math.isqrt(n)
    predictions: list[str] = []
    counts: list[int] = []
    for batch in batches(examples, batch_size, progress, desc):
        enc = prompt_inputs(processor, batch, model.device, model.dtype)
        pixels = enc["pixel_values"]
        image = model.model.get_image_features(pixel_values=pixels, return_dict=True)
        pivots = functools.cache(lambda pixels=pixels: cls_attention(model, pixels))
        reduced = []
        for i, feats in enumerate(image.pooler_output):
            ctx = ImageContext(n, [GridSegment(0, side, side)], pivot_scores=lambda i=i, pivots=pivots: pivots()[i])
            out = reducer(feats, ctx)
            reduced.append(out.features if isinstance(out, Reduction) else out)
        counts += [len(r) for r in reduced]
        embeds, mask = left_pad(shortened_embeddings(model, enc["input_ids"], reduced))
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        predictions += tokenizer.batch_decode(out, skip_special_tokens=True)
    return score(examples, predictions, sum(counts) / max(1, len(counts)))

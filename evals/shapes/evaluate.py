"""ShapesVQA: an accuracy measure for visual-token pruning that runs on a CPU.

A small LLaVA trained by the project (``vtoken/evals/shapes/assets/shapes_llava``) answers one-word questions about
procedurally generated scenes of coloured shapes; every answer needs specific image regions, so *which*
visual tokens survive pruning decides the accuracy.

>>> model, processor = load_shapes_model()
>>> result = evaluate(model, processor, make_split("test", 200))   # dense
>>> with vtoken.patch(model, "todre", keep=0.25):
...     pruned = evaluate(model, processor, make_split("test", 200))

``evaluate`` calls ``model.generate`` on batched, left-padded inputs built by the processor, exactly as a user
would, so any vtoken-patched model is evaluated unchanged.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vtoken.evals.shapes.data import Example, make_split
from vtoken.evals.shapes.model import load_shapes_model

__all__ = [
    "Example", "ShapesResult", "evaluate", "export_split", "load_shapes_model", "make_split",
    "normalize_answer",
]


@dataclass
class ShapesResult:
    accuracy: float
    per_type: dict[str, float]
    n: int
    predictions: list[str] = field(repr=False)
    correct: list[bool] = field(repr=False)
    visual_tokens: float | None = None  # mean visual tokens the LLM saw, where the caller knows it

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        types = "  ".join(f"{t} {100 * a:5.1f}" for t, a in self.per_type.items())
        return f"accuracy {100 * self.accuracy:5.1f}% (n={self.n})  {types}"


def normalize_answer(text: str) -> str:
    """First word, lower-case, without surrounding punctuation: the exact-match form of an answer."""
    words = text.strip().lower().split()
    return words[0].strip(string.punctuation) if words else ""


def score(examples: Sequence[Example], predictions: list[str], visual_tokens: float | None = None) -> ShapesResult:
    correct = [normalize_answer(p) == e.answer for p, e in zip(predictions, examples)]
    per_type = {}
    for t in dict.fromkeys(e.type for e in examples):  # the task's types, in order of appearance
        hits = [c for c, e in zip(correct, examples) if e.type == t]
        if hits:
            per_type[t] = sum(hits) / len(hits)
    accuracy = sum(correct) / max(1, len(correct))
    return ShapesResult(accuracy, per_type, len(correct), predictions, correct, visual_tokens)


def batches(examples: Sequence[Example], batch_size: int, progress: bool, desc: str):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, unit="batch", leave=False):
        yield examples[start : start + batch_size]


def prompt_inputs(processor, examples: Sequence[Example], device, dtype) -> dict:
    """Left-padded model inputs for ``examples``, pixel values in the model's dtype (what a user would build)."""
    enc = processor(images=[e.image for e in examples], text=[e.prompt for e in examples], padding=True,
                    padding_side="left", return_tensors="pt").to(device)
    enc["pixel_values"] = enc["pixel_values"].to(dtype)
    return dict(enc)


@torch.no_grad()
def evaluate(model, processor, examples: Sequence[Example], batch_size: int = 32, max_new_tokens: int = 3,
             progress: bool = True, desc: str = "ShapesVQA") -> ShapesResult:
    """Exact-match accuracy of greedy ``model.generate`` on left-padded batches, overall and per type."""
    tokenizer = processor.tokenizer
    predictions: list[str] = []
    for batch in batches(examples, batch_size, progress, desc):
        enc = prompt_inputs(processor, batch, model.device, model.dtype)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        predictions += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return score(examples, predictions)


def export_split(split: str, n: int, out_dir: str | Path) -> Path:
    """Write ``n`` examples of ``split`` as a local lmms-eval-style dataset: ``images/<split>_<i>.png`` and
    ``<split>.jsonl`` rows ``{question_id, image (absolute path), question, answer, type}``. Returns the JSONL."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{split}.jsonl"
    with path.open("w") as f:
        for e in make_split(split, n):
            image = (out_dir / "images" / f"{split}_{e.index:05d}.png").resolve()
            e.image.save(image)
            row = {"question_id": f"{split}_{e.index}", "image": str(image), "question": e.question,
                   "answer": e.answer, "type": e.type}
            f.write(json.dumps(row) + "\n")
    return path

"""Write a local lmms-eval task (JSONL + PNGs + YAML + utils.py) from (image, question, answer) examples.

    task_dir = write_task("tasks", "colours", [(img, "What colour is the square?", "red"), ...])
    python -m lmms_eval eval --include_path tasks --tasks colours --model vtoken --model_args ...

The task needs no network: lmms-eval reads the JSONL with the ``json`` dataset builder and ``utils.py`` opens
the PNGs next to it. Free-form tasks score ``exact_match`` (case, surrounding blanks and a final full stop are
ignored); with ``choices`` the task is ``multiple_choice`` scored by loglikelihood (``acc``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

UTILS = '''"""Written by vtoken.evals.lmms.tasks.write_task."""
import re
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    with Image.open(HERE / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def normalize(text):
    return re.sub(r"\\s+", " ", str(text)).strip().rstrip(".!").strip().lower()


def process_results(doc, results):
    return {"exact_match": float(normalize(results[0]) == normalize(doc["answer"]))}


def doc_to_choice(doc):
    return doc["choices"]


def doc_to_target(doc):
    return doc["choices"].index(doc["answer"])
'''

FREE_FORM = """output_type: generate_until
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

MULTIPLE_CHOICE = """output_type: multiple_choice
doc_to_choice: !function utils.doc_to_choice
doc_to_target: !function utils.doc_to_target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

TASK = """# Written by vtoken.evals.lmms.tasks.write_task; run with --include_path {root}
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    {split}: {data}
test_split: {split}
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
lmms_eval_specific_kwargs:
  default:
    pre_prompt: {pre_prompt}
    post_prompt: {post_prompt}
{body}metadata:
  version: 0.0
"""


def write_task(root: str | Path, name: str, examples: Iterable, *, split: str = "test", max_new_tokens: int = 16,
               pre_prompt: str = "", post_prompt: str = "", choices: list[str] | None = None) -> Path:
    """Write task ``name`` into ``root/name`` and return that folder; pass ``root`` as ``--include_path``.

    ``examples`` yields ``(PIL image, question, answer)``. ``pre_prompt``/``post_prompt`` wrap every question
    (e.g. ``post_prompt="\\nAnswer with one word."``). ``choices`` turns the task into multiple choice over
    those answers, every answer being one of them. The YAML holds the absolute path of the data file: write the
    task again after moving it.
    """
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name or ""):
        raise ValueError(f"name must start with a letter and hold only letters, digits and '_'; got {name!r}")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", split):
        raise ValueError(f"split must start with a letter and hold only letters, digits and '_'; got {split!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
    if choices is not None and (len(choices) < 2 or len(set(choices)) != len(choices)):
        raise ValueError(f"choices must hold two or more distinct answers; got {choices!r}")
    task_dir = Path(root).resolve() / name
    (task_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, example in enumerate(examples):
        image, question, answer = _unpack(example, i)
        if choices is not None and answer not in choices:
            raise ValueError(f"example {i}: answer {answer!r} is not one of choices {choices!r}")
        path = f"images/{split}_{i:05d}.png"
        image.save(task_dir / path)
        row = {"id": i, "image": path, "question": question, "answer": answer}
        if choices is not None:
            row["choices"] = list(choices)
        rows.append(row)
    if not rows:
        raise ValueError("examples is empty: a task needs at least one (image, question, answer)")
    data = task_dir / f"{split}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (task_dir / "utils.py").write_text(UTILS)
    body = MULTIPLE_CHOICE if choices is not None else FREE_FORM.format(max_new_tokens=max_new_tokens)
    (task_dir / f"{name}.yaml").write_text(TASK.format(
        root=task_dir.parent, name=name, split=split, data=json.dumps(str(data)), body=body,
        pre_prompt=json.dumps(pre_prompt), post_prompt=json.dumps(post_prompt),
    ))
    return task_dir


def _unpack(example, i: int) -> tuple:
    from PIL import Image

    try:
        image, question, answer = example
    except (TypeError, ValueError):
        raise ValueError(f"example {i}: expected (PIL image, question, answer), got {example!r:.120}") from None
    if not isinstance(image, Image.Image):
        raise ValueError(f"example {i}: the image must be a PIL.Image.Image, got {type(image).__name__}")
    if not isinstance(question, str) or not isinstance(answer, str):
        raise ValueError(f"example {i}: question and answer must be strings, got {question!r}, {answer!r}")
    return image, question, answer

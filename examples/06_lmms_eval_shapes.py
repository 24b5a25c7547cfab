"""Accuracy through lmms-eval: the ``vtoken`` model (``--model vtoken``) on a local ShapesVQA task, dense and pruned.

Writes a handful of ShapesVQA test questions as a local lmms-eval task (images + JSONL + YAML, no network), then
evaluates the shipped checkpoint with lmms-eval's own ``simple_evaluate``: dense, and with a few vtoken methods.
lmms-eval finds ``vtoken`` through the ``lmms_eval.models`` entry point that ``pip install 'vtoken[eval]'`` registers.
Needs the ``eval`` extra. With ``--out DIR`` the task stays, and the script prints the same run as a command line
(``vtoken eval``, which starts lmms-eval's CLI and checks its results file).

In-process, lmms-eval is imported once for all the runs, and a ``TaskManager`` that indexes only our task folder
skips the hundreds of tasks lmms-eval bundles.

    python examples/06_lmms_eval_shapes.py [--limit 16] [--out DIR]
"""

import argparse
import json
import tempfile
from pathlib import Path

from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager

from vtoken.evals.lmms.tasks import write_task
from vtoken.evals.shapes.evaluate import make_split
from vtoken.evals.shapes.model import ASSET_DIR

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--limit", type=int, default=16, help="test questions (default 16)")
parser.add_argument("--out", default=None, help="where the task and the stats go (default: a temporary folder)")
args = parser.parse_args()

with tempfile.TemporaryDirectory(prefix="vtoken-lmms-") as scratch:
    out = Path(args.out or scratch)
    # 1. A local lmms-eval task from (image, question, answer) triples; free-form answers scored by exact match.
    questions = make_split("test", args.limit)
    write_task(out / "tasks", "shapes_vqa", ((q.image, q.question, q.answer) for q in questions), max_new_tokens=3)
    print(f"task written to {out / 'tasks' / 'shapes_vqa'}" + ("" if args.out else " (removed at the end)"))
    tasks = TaskManager(include_path=str(out / "tasks"), include_defaults=False, verbosity="WARNING")

    # 2. The same task, dense and with vtoken methods: only model_args change (method fields go there too).
    runs = {"dense": "", "todre keep=0.1": "method=todre,keep=0.1", "random keep=0.1": "method=random,keep=0.1"}
    rows = []
    for i, (name, method_args) in enumerate(runs.items()):
        stats_path = out / f"stats_{i}.json"  # the model's visual-token tally, rewritten after every batch
        model_args = f"pretrained={ASSET_DIR},device=cpu,dtype=float32,stats_path={stats_path}"
        results = simple_evaluate(model="vtoken", model_args=f"{model_args},{method_args}".rstrip(","),
                                  tasks=["shapes_vqa"], batch_size=8, task_manager=tasks, log_samples=False,
                                  verbosity="WARNING")
        metric = results["results"]["shapes_vqa"]["exact_match,none"]
        stats = json.loads(stats_path.read_text())
        rows.append((name, metric, stats["visual_tokens_llm"] / stats["samples"]))

if args.out:
    print(f"\nthe todre run from the command line:\n  vtoken eval --tasks shapes_vqa --include_path {out / 'tasks'} "
          f"--output_path {out / 'runs'} --model_args pretrained={ASSET_DIR},method=todre,keep=0.1,device=cpu")
print(f"\n{'run':<16} {'exact_match':>11} {'visual tokens into the LLM':>27}")
for name, metric, visual in rows:
    print(f"{name:<16} {metric:11.4f} {visual:27.1f}")

"""Compare the LLaVA methods at one visual-token budget and read what each did from ``handle.stats``.

Lists the registry (``vtoken.methods()``), then runs every method that supports LLaVA on the same batch of ShapesVQA
test questions with the shipped checkpoint (offline) and prints accuracy next to the visual tokens the LLM saw,
per decoder layer, and the time each method spent choosing tokens.

    python examples/02_compare_methods.py [--keep 0.1] [--n 40]
"""

import argparse
import statistics
import time

import vtoken
from vtoken.evals.shapes.evaluate import evaluate, load_shapes_model, make_split
from vtoken.evals.shapes.model import num_visual_tokens

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--keep", type=float, default=0.1, help="fraction of the visual tokens kept (default 0.1)")
parser.add_argument("--n", type=int, default=40, help="test questions, run as one batch (default 40)")
args = parser.parse_args()

# Every method, its config fields (what vtoken.patch accepts) and the model families it supports.
for name, info in vtoken.methods().items():
    print(f"{name:<17} hosts: {', '.join(info.hosts):<45} {info.summary}")
print("todre fields:", vtoken.methods()["todre"].fields())
print()

model, processor = load_shapes_model()
questions = make_split("test", args.n)
evaluate(model, processor, questions[:2], progress=False)  # warm-up, so that the first row timed is not slower

# The same budget expressed in each method's own arguments.
configs = {
    "todre": dict(keep=args.keep),  # diversity selection after the projector (+ late removal of all visual tokens)
    "random": dict(keep=args.keep),
    "pool": dict(keep=args.keep),
    "attn_topk": dict(keep=args.keep),  # FastV: prunes inside the LLM, after layer K
    "transprune": dict(keep=args.keep),  # inside the LLM, in stages: token transition + instruction attention
    "corematching": dict(keep=args.keep),  # inside the LLM by FFN core neurons; decode runs only those neurons
    "token_clustering": dict(num_clusters=args.keep, reconstruct=False),  # fewer tokens out of the vision tower
}


def timed_evaluate():
    """Accuracy of one batched generate() (so ``handle.stats`` describes all of it) and questions per second."""
    start = time.perf_counter()
    result = evaluate(model, processor, questions, batch_size=len(questions), progress=False)
    return result, len(questions) / (time.perf_counter() - start)


def show(name, accuracy, into_llm, per_layer, select_s, score_s, per_second):
    print(f"{name:<17} {100 * accuracy:5.1f}%  {into_llm:6.1f}  {str(per_layer):<22} {1000 * select_s:9.1f} "
          f"{1000 * score_s:8.1f}  {per_second:5.1f}")


n_visual = num_visual_tokens(model)
print(f"ShapesVQA, {args.n} test questions in one batch, keep = {args.keep:g} of {n_visual} visual tokens")
print(f"{'method':<17} {'acc':>6}  {'to LLM':>6}  {'visual tokens/layer':<22} {'select ms':>9} {'score ms':>8}  q/s")
dense, per_second = timed_evaluate()
layers = model.config.text_config.num_hidden_layers
show("dense", dense.accuracy, n_visual, [n_visual] * layers, 0.0, 0.0, per_second)
for method, config in configs.items():
    with vtoken.patch(model, method, **config) as handle:
        result, per_second = timed_evaluate()
        stats = handle.stats  # the last prefill: here the whole batch
        per_layer = [round(statistics.mean(layer)) for layer in stats.visual_tokens_per_layer]
        show(method, result.accuracy, statistics.mean(stats.visual_tokens_llm), per_layer, stats.selection_time_s,
             stats.scoring_time_s, per_second)

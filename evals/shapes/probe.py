"""``vtoken probe-position``: how well each layer of a ShapesVQA model's vision tower still knows where each patch is.

A question about where shapes lie (ShapesVQA-Hard's ``nearest``) needs every token to carry its position, but no
per-patch label of stage 1 asks for it: colour, shape, digit and counts are the same wherever a shape is, so a tower
may learn to drop the position codes it starts with. This probe reads the position back from each layer: a
least-squares linear map from a layer's patch tokens (and the projector's) to the patch's row and column, fitted on
half of a batch of fresh scenes and scored on the other half as the mean absolute error in patches. ``chance`` is the
same error for always answering the fitted half's mean; a layer at chance has lost the position to a linear reader.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch

from vtoken.evals.common.arguments import add_threads_argument, positive_int
from vtoken.evals.common.machine import set_threads

SEED = 7000  # scenes that no split or training run draws (their seeds start 1000-6000)


@dataclass(frozen=True)
class LayerPosition:
    layer: str  # "embeddings", "block N" (after tower block N) or "projected"
    row_error: float  # mean absolute error of the linear read-out, in patches, on every patch
    col_error: float
    row_error_shapes: float  # the same on the patches that belong to a shape
    col_error_shapes: float


def linear_readout_error(features: torch.Tensor, target: torch.Tensor, fit: torch.Tensor, score: torch.Tensor) -> float:
    """Mean absolute error on ``score`` rows of the least-squares map from ``features`` (+ a bias) to ``target``
    fitted on ``fit`` rows (boolean masks)."""
    x = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], 1)
    weights = torch.linalg.lstsq(x[fit], target[fit, None].double()).solution
    return (x[score] @ weights).squeeze(1).sub(target[score]).abs().mean().item()


@torch.no_grad()
def position_probe(model, processor, data, scenes: int = 48, seed: int = SEED) -> tuple[list[LayerPosition], float]:
    """Per-layer linear read-out errors of patch row and column, and the chance error, on ``scenes`` fresh scenes
    of the task whose data module is ``data`` (half fit, half scored)."""
    if isinstance(scenes, bool) or not isinstance(scenes, int) or scenes < 2:
        raise ValueError(f"scenes must be an int >= 2 (half fit the read-out, half score it); got {scenes!r}")
    from vtoken.evals.shapes.training import render_scenes

    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    pixels, _, targets = render_scenes(data, processor, np.random.default_rng([seed, 0]), scenes)
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    pixels = pixels.to(device=tower.device, dtype=tower.dtype)
    hidden = tower(pixels, output_hidden_states=True).hidden_states  # embeddings, then after each block
    layers = [(("embeddings" if i == 0 else f"block {i}"), h[:, 1:]) for i, h in enumerate(hidden)]
    layers.append(("projected", projector(hidden[-1][:, 1:])))
    patches = side * side
    rows = torch.arange(side, dtype=torch.float64).repeat_interleave(side).repeat(scenes)
    cols = torch.arange(side, dtype=torch.float64).repeat(side).repeat(scenes)
    on_shape = (targets[:, 0] > 0).flatten()  # the first target is the colour, 0 on the background
    fit = torch.arange(scenes * patches) < (scenes // 2) * patches
    results = []
    for name, tokens in layers:
        flat = tokens.reshape(scenes * patches, -1).float().cpu()
        errors = [linear_readout_error(flat, target, fit & subset, ~fit & subset)
                  for subset in (torch.ones_like(fit), on_shape) for target in (rows, cols)]
        results.append(LayerPosition(name, errors[0], errors[1], errors[2], errors[3]))
    chance = (rows[~fit] - rows[fit].mean()).abs().mean().item()
    return results, chance


def format_table(results: list[LayerPosition], chance: float) -> str:
    lines = [f"{'layer':12s} | row error | col error | row, shapes | col, shapes   (patches; chance {chance:.2f})",
             "-" * 13 + "+-----------+-----------+-------------+------------"]
    lines += [f"{r.layer:12s} | {r.row_error:9.2f} | {r.col_error:9.2f} | {r.row_error_shapes:11.2f} | "
              f"{r.col_error_shapes:10.2f}" for r in results]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vtoken.evals.shapes.quality import add_task_arguments

    add_task_arguments(parser)
    parser.add_argument("--scenes", type=positive_int, default=48,
                        help="fresh scenes: the first half fit each read-out, the second half score it")
    add_threads_argument(parser)
    parser.add_argument("--json", default=None, help="also write the table here")


def run(args: argparse.Namespace) -> int:
    from vtoken.cli import usage_errors
    from vtoken.evals.shapes.model import TASKS, load_task_model

    threads = set_threads(args.threads)
    with usage_errors():
        model, processor = load_task_model(args.task, args.model)
        results, chance = position_probe(model, processor, TASKS[args.task].data, args.scenes)
    print(f"{TASKS[args.task].title}: linear read-out of each patch's position, {args.scenes} fresh scenes")
    print(threads.line())
    print(format_table(results, chance))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"task": args.task, "model": args.model, "scenes": args.scenes, "chance": chance,
                       "layers": [asdict(r) for r in results]}, f, indent=2)
        print(f"wrote {args.json}")
    return 0

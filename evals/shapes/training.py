"""Train the ShapesVQA LLaVA from scratch on a CPU.

    python -m vtoken.evals.shapes.training --out DIR

Two stages, like LLaVA's own recipe but with the vision tower trained here instead of downloaded:

1. **Vision.** The CLIP-shaped tower and the projector learn per-patch targets read off the scene (colour,
   shape, grid cell, how many shapes share this colour, which shape is in each neighbouring cell:
   ``shapes_data.patch_targets``) through small linear heads on the projected tokens. Dense labels train a
   from-scratch tower in minutes where the answer loss alone gives it a weak, late signal, and they make each
   shape's tokens carry what the questions ask about that shape, so answers need the right tokens.
2. **Language.** The tower is frozen and its outputs for ``--scenes`` generated scenes are cached; the
   projector (still under the patch loss) and the Llama decoder learn the questions. Each sample is one scene
   with several questions packed into one sequence ("<s> USER: <image> | q1 ASSISTANT: a1 </s> | q2 ..."),
   whose attention mask and positions make every question see only the image prompt and itself: each turn is
   exactly the single-question evaluation prompt, but the image is read once for all of them. With
   ``--tower-lr`` the tower keeps learning in stage 2 too, from the answer and patch losses, on scenes rendered
   afresh every step (no cache): what no per-patch label taught it (counts, neighbours) can then come from the
   answers.

``--token-drop P``: a fraction P of the language samples sees a random subset of its visual tokens (kept
share ~ U[--min-keep, 1], raster order, prompt shortened to match), as in TokenFLEX's stochastic token counts.
A model that only ever saw 196 visual tokens also meets a length shift when a method prunes; with it, a
method's accuracy at a budget reflects which tokens it kept.

Deterministic: the data of every step is a pure function of (``--seed``, stage, step), and torch is seeded.
Runs through accelerate in one process: on a GPU when there is one (``--cpu`` to stay on the CPU), with
``--mixed-precision fp16/bf16`` autocast if asked; on the CPU the weights are the same bytes as plain PyTorch.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vtoken.cli import HelpFormatter
from vtoken.evals.common.arguments import (
    checkpoint_dir,
    kept_share,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    share,
)
from vtoken.evals.shapes.data import COLORS, IGNORE, RELATIONS, SHAPES, count_attention, evidence_patches
from vtoken.evals.shapes.model import TASKS, build_model, build_processor, check_vocabulary, load_shapes_model
from vtoken.training import optimizer_for, packed_inputs, param_groups


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory for the trained model, processor and report")
    parser.add_argument("--task", choices=tuple(TASKS), default="shapes",
                        help="ShapesVQA, or ShapesVQA-Hard (trained with no attention targets)")
    parser.add_argument("--vision-steps", type=non_negative_int, default=2500,
                        help="optimizer steps of stage 1 (vision)")
    parser.add_argument("--vision-batch-size", type=positive_int, default=32, help="images per stage-1 step")
    parser.add_argument("--vision-lr", type=float, default=2e-3, help="stage-1 learning rate")
    parser.add_argument("--vision-only", action="store_true", help="save the model after stage 1 and stop")
    parser.add_argument("--init", type=checkpoint_dir, help="start from this saved model (e.g. a --vision-only run; "
                                                            "with --vision-steps 0 stage 1 is skipped)")
    parser.add_argument("--scenes", type=positive_int, default=6000, help="scenes whose tower outputs stage 2 caches")
    parser.add_argument("--tower-lr", type=non_negative_float, default=0.0,
                        help="stage 2 also trains the tower at this learning rate, on scenes rendered afresh every "
                             "step instead of the --scenes cache (0 = frozen tower, cached outputs)")
    parser.add_argument("--steps", type=positive_int, default=2000, help="optimizer steps of stage 2 (language)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="scenes per stage-2 step")
    parser.add_argument("--turns", type=positive_int, default=12, help="questions per scene (packed into one sequence)")
    parser.add_argument("--lr", type=float, default=1e-3, help="stage-2 learning rate")
    parser.add_argument("--warmup", type=non_negative_int, default=100,
                        help="linear warm-up steps before cosine decay")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (both stages)")
    parser.add_argument("--patch-loss", type=float, default=0.5, help="weight of the patch loss in stage 2")
    parser.add_argument("--lookup-loss", type=float, default=None,
                        help="weight of the decoder lookup heads' attention targets (ShapesVQA only; default 1, "
                             "0 = off; on needs eager attention)")
    parser.add_argument("--token-drop", type=share, default=0.3,
                        help="fraction of stage-2 samples trained on a random subset of their visual tokens")
    parser.add_argument("--focus-steps", type=non_negative_int, default=0,
                        help="curriculum: the first N stage-2 steps show the shapes' tokens only, then ever more of "
                             "the background (see focused_tokens)")
    parser.add_argument("--min-keep", type=kept_share, default=0.1, help="smallest kept share under --token-drop")
    parser.add_argument("--position-scale", type=float, default=1.0,
                        help="amplitude of the sine-cosine initialisation of the tower's position embeddings")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seeds the model and every step's data")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where accelerate finds a GPU")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                        help="accelerate's autocast for the forward passes (GPU)")
    parser.add_argument("--time-limit", type=positive_float, default=None, metavar="MINUTES",
                        help=f"stage 2's wall-time budget: after its first {TIMING_STEPS} steps (or 10%% of it) "
                             "the run is shortened to the steps that fit (at most --steps), and its cosine schedule "
                             "with it; validation counts, the tower cache and the test do not")
    parser.add_argument("--eval-every", type=non_negative_int, default=250,
                        help="validation every N stage-2 steps (0 = never)")
    parser.add_argument("--val-size", type=non_negative_int, default=200, help="validation examples")
    parser.add_argument("--test-size", type=non_negative_int, default=1000,
                        help="test examples for the final report (0 = no test)")
    parser.add_argument("--save-dtype", choices=("float16", "float32"), default="float16",
                        help="dtype of the saved weights (they load back as float32)")
    parser.add_argument("--tiny", action="store_true", help="a minute-sized model for smoke tests")


# ---------------------------------------------------------------------------------------------- samples
def step_rng(args, stage: int, step: int) -> np.random.Generator:
    return np.random.default_rng([TASKS[args.task].data.SPLIT_SEEDS["train"], args.seed, stage, step])


# The decoder heads taught where to look (see answer_attention_targets): layer 0's heads gather the question's
# colour, shape and position words and its first two words into its last token, layer 1's heads look up a
# relation's referent (one head per side), layer 2 the evidence of any question, layer 3 names the answer.
GATHER_LAYER, LOOKUP_LAYER, LOOKUP_HEAD, RELATION_LAYER = 0, 2, 0, 1
POSITION_WORDS = {"top", "middle", "bottom", "left", "right", "center", "above", "below"}
GATHER_WORDS = (set(COLORS), set(SHAPES), POSITION_WORDS)  # then the first two words (the question type)

# The tower head taught to count (see shapes_data.count_attention): layer 2 of 4 leaves a layer and the
# projector to turn the weight on [CLS] into the colour-count feature.
COUNT_LAYER, COUNT_HEAD = 2, 0


def render_scenes(data: ModuleType, processor, rng: np.random.Generator, n: int):
    """``n`` fresh training scenes of task ``data``: (pixel values, scenes, (n, targets, patches) patch targets)."""
    scenes = [data.random_scene(rng) for _ in range(n)]
    pixels = processor.image_processor([data.render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    patch_size = processor.patch_size
    targets = torch.from_numpy(np.stack([data.patch_targets(s, patch_size) for s in scenes]))
    return pixels, scenes, targets


def packed_ids(tokenizer, qa: list[tuple[str, str, str]]):
    """Token ids of one scene's training sample: the shared prefix before the image ("<s> USER :") and, per
    question, the ids of "question ASSISTANT : answer </s>" with labels on the answer and EOS (-100 elsewhere)."""

    def words(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    prefix = [tokenizer.bos_token_id] + words("USER:")
    turns = []
    for _, question, answer, *_ in qa:
        prompt = words(question + " ASSISTANT:")
        reply = words(answer) + [tokenizer.eos_token_id]
        turns.append((prompt + reply, [-100] * len(prompt) + reply))
    return prefix, turns


def word_positions(tokens: list[str]) -> list[list[int]]:
    """Per layer-0 gather head, the positions (within a turn) of the prompt words it should read."""
    picks = [[j for j, t in enumerate(tokens) if t in words] for words in GATHER_WORDS]
    return picks + [[0, 1]]


def focused_tokens(on_shape: torch.Tensor, progress: float, gen: torch.Generator) -> torch.Tensor:
    """The curriculum's kept visual tokens at ``progress`` (0 to 1) through ``--focus-steps``: every token of a shape
    (``on_shape``, from the patch labels), and none of the background for the first half, then a random share of it
    that grows linearly to all of it.

    With no attention target, the decoder must find the tokens a question names from the answer loss alone. Among
    196 tokens a uniform first guess gives the right ones about 1/196 of the weight each, and the run without this
    stayed at chance for 500 steps; among the 20-30 tokens of the shapes, the answer's gradient reaches them 7-10x
    as strongly. This only chooses which tokens a sample shows; no loss reads an attention map."""
    background = (~on_shape).nonzero().flatten()
    share = min(1.0, max(0.0, 2 * progress - 1))
    picked = background[torch.randperm(len(background), generator=gen)[: round(share * len(background))]]
    return torch.cat([on_shape.nonzero().flatten(), picked]).sort().values


def answer_attention_targets(qas, samples, kept, targets, length: int, tokenizer):
    """Rows to supervise and target distributions for the decoder's lookup heads.

    The last prompt token of every packed question attends, in head ``LOOKUP_HEAD`` of layer ``LOOKUP_LAYER``,
    uniformly to the question's evidence patches that survived token drop, or to BOS (position 0, the usual
    attention sink) when there are none ("no" presence, count zero, all dropped). In layer ``RELATION_LAYER``,
    head i does the same for relation questions about ``RELATIONS[i]`` and rests on BOS otherwise, so each
    head's values only need the neighbour feature of its own side (one linear read instead of a choice among
    four).

    Layer ``GATHER_LAYER``'s heads get targets too (``word_positions``, read through ``tokenizer``), so the last
    token holds the words the later lookups are keyed on.

    ``qas[i]`` are sample i's ``scene_questions``, ``kept[i]`` its kept patch indices, ``targets[i]`` the scene's
    ``patch_targets``. Returns ``(batch index, query position)`` tensors and the targets of the lookup head
    (rows, length), the relation heads (rows, len(RELATIONS), length) and the gather heads (rows, 4, length)."""
    rows_b, rows_q, lookup, relation, gather = [], [], [], [], []
    for b, (qa, (prefix, turns), keep, target) in enumerate(zip(qas, samples, kept, targets)):
        start = len(prefix) + len(keep)
        for (qtype, _, _, meta), (ids, labels) in zip(qa, turns):
            prompt = next(i for i, lab in enumerate(labels) if lab != -100)
            dist = torch.zeros(length)
            evidence = torch.from_numpy(evidence_patches(qtype, meta, target))[keep].nonzero().flatten()
            if len(evidence):
                dist[len(prefix) + evidence] = 1.0 / len(evidence)
            else:
                dist[0] = 1.0
            sides = torch.zeros(len(RELATIONS), length)
            sides[:, 0] = 1.0
            if qtype == "relation":
                sides[RELATIONS.index(meta["relation"])] = dist
            words = torch.zeros(len(GATHER_WORDS) + 1, length)
            for h, picks in enumerate(word_positions(tokenizer.convert_ids_to_tokens(ids[:prompt]))):
                if picks:
                    words[h, [start + j for j in picks]] = 1.0 / len(picks)
                else:
                    words[h, 0] = 1.0
            gather.append(words)
            rows_b.append(b)
            rows_q.append(start + prompt - 1)
            lookup.append(dist)
            relation.append(sides)
            start += len(ids)
    return torch.tensor(rows_b), torch.tensor(rows_q), torch.stack(lookup), torch.stack(relation), torch.stack(gather)


class PatchHeads(torch.nn.Module):
    """Linear read-outs of every projected visual token's patch targets (training only: the model never reads
    them); ``classes`` per target, the first target being the colour (0 = background) in every task. Saved beside
    the checkpoint (``HEADS_FILE``) so that a run continuing it (``--init``) resumes them: fresh heads would send
    random gradients through the projector, and with ``--tower-lr`` the tower, until they caught up."""

    def __init__(self, dim: int, classes: tuple[int, ...]):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(dim, n) for n in classes)

    def forward(self, feats: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over targets, and (2, targets) counts of the right answers and of the patches scored:
        the labelled (not ``IGNORE``) patches of shapes. ``feats`` (B, P, D), ``targets`` (B, T, P). Background
        patches are most of the image and trivially colour/shape 0, so counting them would hide a tower that cannot
        tell the shapes apart; an ``IGNORE`` patch has no right answer, so counting it would understate one that
        can. Counts, not ratios, so that batches without a scored patch average in (see ``patch_accuracy``)."""
        losses, hits, scored = [], [], []
        on_shape = (targets[:, 0] > 0).flatten()
        for i, head in enumerate(self.heads):
            logits, target = head(feats).flatten(0, 1), targets[:, i].flatten()
            losses.append(F.cross_entropy(logits, target, ignore_index=IGNORE))
            labelled = on_shape & (target != IGNORE)
            hits.append((logits.argmax(-1) == target)[labelled].sum())
            scored.append(labelled.sum())
        return torch.stack(losses).mean(), torch.stack([torch.stack(hits), torch.stack(scored)]).float().detach()


def patch_accuracy(counts: torch.Tensor) -> torch.Tensor:
    """(targets,) accuracy from ``PatchHeads`` counts (2, targets), summed or averaged over batches; NaN where no
    patch was scored."""
    return counts[0] / counts[1].where(counts[1] > 0, torch.nan)


HEADS_FILE = "patch_heads.pt"


def describe_restored(restored: int, targets: int) -> str:
    """The report's ``patch_heads``: where the run's per-patch heads started."""
    if restored == 0:
        return "fresh"
    if restored == targets:
        return "restored from --init"
    return f"restored from --init ({restored} of {targets} targets; the rest fresh)"


def restore_patch_heads(heads: PatchHeads, init: str | None) -> int:
    """Load ``heads`` from the checkpoint at ``init`` if it saved them, and return how many targets' heads it held
    (0 when there is none: a checkpoint trained before heads were saved, or no ``init``). A checkpoint saved before
    targets were added at the end of the task's list (the hard task's row and column) restores the heads it has; the
    new ones start fresh."""
    if not init or not (path := Path(init) / HEADS_FILE).is_file():
        return 0
    saved = torch.load(path, map_location="cpu", weights_only=True)
    restored = len({key.split(".")[1] for key in saved})
    expected = {key for key in heads.state_dict() if int(key.split(".")[1]) < restored}
    try:
        if set(saved) != expected:
            raise RuntimeError(f"it holds {sorted(saved)}, this task's first {restored} heads {sorted(expected)}")
        heads.load_state_dict(saved, strict=False)  # the keys are checked above; a size mismatch still raises
    except RuntimeError as e:  # the task's targets changed since that checkpoint was trained
        raise ValueError(f"--init {init}: its {HEADS_FILE} does not fit this task's patch targets ({e})") from None
    return restored


def ema(old, new, decay=0.95):
    return new if old is None else decay * old + (1 - decay) * new


# --------------------------------------------------------------------------------------------- training
def attention_cross_entropy(attention: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of attention rows (..., keys) against target distributions of the same shape, over the
    rows that have a target (all-zero target rows are skipped)."""
    rows = target.sum(-1) > 0
    return -(target * attention.clamp_min(1e-9).log()).sum(-1)[rows].mean()


def heads_loss(attentions, rows_b, rows_q, layer: int, first_head: int, target: torch.Tensor) -> torch.Tensor:
    """``attention_cross_entropy`` of heads ``first_head, ...`` of decoder ``layer`` at query rows
    ``(rows_b, rows_q)`` against ``target`` (rows, heads, keys). Tiny smoke-test models have fewer layers and
    heads: the last layer and the heads that exist stand in."""
    probs = attentions[min(layer, len(attentions) - 1)]
    n = min(target.shape[1], probs.shape[1] - first_head)
    return attention_cross_entropy(probs[rows_b, first_head : first_head + n, rows_q], target[:, :n])


def train_vision(args, accelerator, model, heads, processor) -> dict:
    """Stage 1: tower + projector + heads on the patch targets (and, on ShapesVQA, the counting head's attention).

    Counting needs every shape's tokens to aggregate over the whole image; on ShapesVQA, from per-patch count
    labels alone the tower did not find that in 1000 steps, so one head's attention is supervised there (eager
    attention, for the weights). The hard task's tower learns its counts from the per-patch labels alone."""
    task = TASKS[args.task]
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    groups = param_groups([tower, projector, heads], args.vision_lr, args.weight_decay)
    optimizer, scheduler = accelerator.prepare(*optimizer_for(groups, args.warmup, args.vision_steps))
    layer = model.config.vision_feature_layer
    counting = task.attention_targets
    model.set_attn_implementation("eager" if counting else "sdpa")
    loss_avg = counts_avg = count_avg = None
    bar = tqdm(range(args.vision_steps), desc="stage 1: vision", unit="step")
    for step in bar:
        pixels, scenes, targets = render_scenes(task.data, processor, step_rng(args, 1, step), args.vision_batch_size)
        pixels, targets = pixels.to(accelerator.device), targets.to(accelerator.device)
        with accelerator.autocast():
            out = tower(pixels, output_hidden_states=True, output_attentions=counting)
            feats = projector(out.hidden_states[layer][:, 1:])
            loss, counts = heads(feats, targets)
            total = loss
            if counting:
                target = torch.from_numpy(np.stack([count_attention(s, processor.patch_size) for s in scenes]))
                block = min(COUNT_LAYER, len(out.attentions) - 1)  # tiny smoke-test towers have fewer
                count_loss = attention_cross_entropy(out.attentions[block][:, COUNT_HEAD, 1:].float(),
                                                     target.to(accelerator.device))
                count_avg = ema(count_avg, count_loss.item())
                total = loss + count_loss
        accelerator.backward(total)
        accelerator.clip_grad_norm_(list(tower.parameters()) + list(projector.parameters()), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_avg, counts_avg = ema(loss_avg, loss.item()), ema(counts_avg, counts.cpu())
        bar.set_postfix(loss=f"{loss_avg:.3f}", **({"count_attn": f"{count_avg:.2f}"} if counting else {}),
                        acc=" ".join(f"{a:.2f}" for a in patch_accuracy(counts_avg).tolist()))
    model.set_attn_implementation("sdpa")
    accuracy = [] if counts_avg is None else patch_accuracy(counts_avg).tolist()
    accuracy = {k: None if math.isnan(a) else a for k, a in zip(task.data.PATCH_TARGETS, accuracy)}  # JSON has no NaN
    return {"loss": loss_avg, "count_attention_loss": count_avg, "patch_accuracy": accuracy}


def tower_outputs(accelerator, model, pixels: torch.Tensor) -> torch.Tensor:
    """The tower's patch tokens as the projector receives them (the feature layer, [CLS] dropped)."""
    with accelerator.autocast():
        states = model.model.vision_tower(pixels.to(accelerator.device), output_hidden_states=True).hidden_states
    return states[model.config.vision_feature_layer][:, 1:]


@torch.no_grad()
def cache_tower(args, accelerator, model, processor, chunk: int = 64):
    """Frozen tower outputs (as the projector receives them) of ``--scenes`` scenes, float16, with the scenes
    and their patch targets."""
    hidden, scenes, targets = [], [], []
    rng = step_rng(args, 3, 0)
    for start in tqdm(range(0, args.scenes, chunk), desc="stage 2: caching tower outputs", unit="chunk"):
        pixels, batch_scenes, batch_targets = render_scenes(TASKS[args.task].data, processor, rng,
                                                            min(chunk, args.scenes - start))
        hidden.append(tower_outputs(accelerator, model, pixels).half())
        scenes += batch_scenes
        targets.append(batch_targets.to(torch.int16))
    return torch.cat(hidden), scenes, torch.cat(targets)


def tower_batch(args, accelerator, model, processor, cache, rng: np.random.Generator, step: int):
    """One stage-2 step's scenes: (tower outputs as the projector receives them, scenes, patch targets). Drawn from
    the frozen tower's ``cache``, or, with ``cache=None`` (``--tower-lr``), rendered afresh and run through the
    tower with gradients, so the answer loss can teach the tower what no per-patch label does (counts, neighbours)."""
    if cache is None:
        pixels, scenes, targets = render_scenes(TASKS[args.task].data, processor, step_rng(args, 4, step),
                                                args.batch_size)
        return tower_outputs(accelerator, model, pixels).float(), scenes, targets
    hidden, scenes, targets = cache
    index = rng.choice(len(scenes), size=args.batch_size, replace=False)
    return hidden[index].float(), [scenes[i] for i in index], targets[index]


def train_language(args, accelerator, model, heads, processor, cache, val, history) -> int:
    """Stage 2: projector + decoder (+ heads) on packed questions over the cached tower outputs, or with
    ``--tower-lr`` (``cache=None``) the tower too, on fresh scenes. Returns the number of steps run (fewer than
    ``--steps`` under ``--time-limit``)."""
    projector = model.model.multi_modal_projector
    groups = param_groups([projector, model.model.language_model, heads], args.lr, args.weight_decay)
    if cache is None:
        groups += param_groups([model.model.vision_tower], args.tower_lr, args.weight_decay)
    horizon = [args.steps]
    optimizer, scheduler = accelerator.prepare(*optimizer_for(groups, args.warmup, lambda: horizon[0]))
    eos = model.config.text_config.eos_token_id
    if args.lookup_loss:
        model.set_attn_implementation("eager")
    loss_avg = acc_avg = lookup_avg = None
    start = time.perf_counter()
    bar = tqdm(total=args.steps, desc="stage 2: language", unit="step")
    step, fitted = -1, not args.time_limit
    while step + 1 < horizon[0]:
        step += 1
        if not fitted and step and (step == TIMING_STEPS or time.perf_counter() - start > 0.1 * args.time_limit * 60):
            fitted = True  # after TIMING_STEPS steps, or 10% of the budget on a slow machine
            horizon[0] = bar.total = steps_that_fit(args, step, time.perf_counter() - start)
            tqdm.write(f"--time-limit {args.time_limit:g} min: stage 2 runs {horizon[0]} of --steps {args.steps}")
        elif args.time_limit and fitted and step % TIMING_STEPS == 0:  # re-fit (validation's cost in the pace)
            horizon[0] = bar.total = min(horizon[0], steps_that_fit(args, step, time.perf_counter() - start))
        model.train()
        rng = step_rng(args, 2, step)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        hidden, scenes, targets = tower_batch(args, accelerator, model, processor, cache, rng, step)
        qas = [TASKS[args.task].data.scene_questions(scene, rng, args.turns) for scene in scenes]
        samples = [packed_ids(processor.tokenizer, qa) for qa in qas]
        kept = []
        for i in range(len(scenes)):
            keep = torch.arange(hidden.shape[1])
            if step < args.focus_steps:
                keep = focused_tokens(targets[i, 0] > 0, step / args.focus_steps, gen)
            elif rng.random() < args.token_drop:
                k = max(1, round(float(rng.uniform(args.min_keep, 1.0)) * len(keep)))
                keep = torch.randperm(len(keep), generator=gen)[:k].sort().values
            kept.append(keep)
        with accelerator.autocast():
            full = projector(hidden.to(accelerator.device))
            patch_loss, _ = heads(full, targets.long().to(accelerator.device))
            features = [f[k.to(f.device)] for f, k in zip(full, kept)]
            embeds, mask, positions, labels = packed_inputs(model, samples, features)
            outputs = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=labels,
                            output_attentions=bool(args.lookup_loss))
            loss = outputs.loss + args.patch_loss * patch_loss
            if args.lookup_loss:
                rows_b, rows_q, dist, sides, words = (t.to(accelerator.device) for t in answer_attention_targets(
                    qas, samples, kept, targets.numpy(), embeds.shape[1], processor.tokenizer))
                at = ([a.float() for a in outputs.attentions], rows_b, rows_q)
                lookup_loss = (heads_loss(*at, LOOKUP_LAYER, LOOKUP_HEAD, dist[:, None])
                               + heads_loss(*at, RELATION_LAYER, 0, sides) + heads_loss(*at, GATHER_LAYER, 0, words))
                lookup_avg = ema(lookup_avg, lookup_loss.item())
                loss = loss + args.lookup_loss * lookup_loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # teacher-forced accuracy on the answer words (logits at t predict t+1)
            target = labels[:, 1:]
            words = (target != -100) & (target != eos)
            hit = (outputs.logits[:, :-1].argmax(-1) == target)[words].float().mean().item()
        loss_avg, acc_avg = ema(loss_avg, outputs.loss.item()), ema(acc_avg, hit)
        bar.update()
        bar.set_postfix(loss=f"{loss_avg:.3f}", acc=f"{acc_avg:.3f}", patch=f"{patch_loss.item():.3f}",
                        lookup=f"{lookup_avg or 0:.2f}")
        if val and ((step + 1) % args.eval_every == 0 or step + 1 == horizon[0]):
            from vtoken.evals.shapes.evaluate import evaluate

            model.eval().set_attn_implementation("sdpa")
            res = evaluate(model, processor, val, progress=False)
            model.set_attn_implementation("eager" if args.lookup_loss else "sdpa")
            history.append({"step": step + 1, "minutes": (time.perf_counter() - start) / 60, "loss": loss_avg,
                            "val_accuracy": res.accuracy, "val_per_type": res.per_type})
            tqdm.write(f"step {step + 1}: loss {loss_avg:.3f}  val {res.summary()}")
    bar.close()
    return step + 1


# --time-limit fits stage 2's length once this many steps (the warm-up's slow first ones among them) are timed, or
# 10% of the budget is spent, whichever comes first; then every as many steps again it may only shorten it, so a run
# that slows down (validation, a busy machine) still ends near its budget
TIMING_STEPS = 50


def steps_that_fit(args: argparse.Namespace, done: int, seconds: float) -> int:
    """Stage 2's length under ``--time-limit``, at the pace of the ``done`` steps so far (``seconds``, validation
    included): at most ``--steps``, at least one more step, with 5% of the budget kept for the final validation."""
    budget = 0.95 * args.time_limit * 60 - seconds
    return max(done + 1, min(args.steps, done + int(budget * done / seconds)))


def loss_terms(args: argparse.Namespace, vision_only: bool = False) -> list[dict]:
    """The loss terms this run optimises, for its training report: stage, name, what it reads, which modules it
    trains, and whether it reads an attention map."""
    terms = []
    tuned = "tower, projector" if args.tower_lr else "projector"
    if args.vision_steps:
        terms.append({"stage": 1, "name": "patch", "reads": "projected visual tokens (per-patch labels)",
                      "trains": "tower, projector", "attention": False})
        if TASKS[args.task].attention_targets:
            terms.append({"stage": 1, "name": "tower_count_attention",
                          "reads": f"tower block {COUNT_LAYER} head {COUNT_HEAD} attention", "trains": "tower",
                          "attention": True})
    if not vision_only:
        terms.append({"stage": 2, "name": "answer", "reads": "LM logits on the answer words and EOS",
                      "trains": f"{tuned}, decoder", "attention": False})
        if args.patch_loss:
            terms.append({"stage": 2, "name": "patch", "reads": "projected visual tokens (per-patch labels)",
                          "trains": tuned, "attention": False})
        if args.lookup_loss:
            terms.append({"stage": 2, "name": "decoder_lookup_attention",
                          "reads": f"decoder layers {GATHER_LAYER}-{LOOKUP_LAYER} attention",
                          "trains": "decoder", "attention": True})
    return terms


def chain_runs(report: dict | None) -> list[dict]:
    """The reports of the runs that made a checkpoint, newest first: its own, then its ``--init``'s, and so on."""
    runs = []
    while report is not None:
        runs.append(report)
        report = report.get("init")
    return runs


def chain_loss_terms(report: dict | None) -> list[dict]:
    """Every loss term of the runs that made a checkpoint, newest run first."""
    return [term for run in chain_runs(report) for term in run["loss_terms"]]


def train(args: argparse.Namespace) -> dict:
    """Both stages in one process, placed and (optionally) autocast by accelerate: the model has 2 M parameters,
    so data parallelism would only add synchronisation; a GPU or ``--mixed-precision`` is what speeds it up."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    if accelerator.num_processes > 1:
        raise ValueError(f"train-shapes runs in one process; got {accelerator.num_processes} (run it without "
                         "`accelerate launch --num_processes`)")
    task = TASKS[args.task]
    if args.lookup_loss is None:
        args.lookup_loss = 1.0 if task.attention_targets else 0.0
    if args.lookup_loss and not task.attention_targets:
        raise ValueError(f"--lookup-loss must be 0 with --task {args.task}: its model learns attention from the answer "
                         f"loss alone; got {args.lookup_loss}")
    if args.tower_lr and args.vision_only:
        raise ValueError(f"--tower-lr trains the tower in stage 2, which --vision-only skips; got --tower-lr "
                         f"{args.tower_lr:g} with --vision-only")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.init:
        model, processor = load_shapes_model(args.init)
        check_vocabulary(processor, args.task, f"--init {args.init}")
    else:
        processor = build_processor(task.data.vocabulary())
        vision, text = (TINY["vision"], TINY["text"]) if args.tiny else ({}, task.text)
        model = build_model(processor, vision, text, seed=args.seed, position_scale=args.position_scale)
    n_params = sum(p.numel() for p in model.parameters())
    heads = PatchHeads(model.config.text_config.hidden_size, task.data.TARGET_CLASSES)
    heads_restored = restore_patch_heads(heads, args.init)
    model.to(accelerator.device)
    heads.to(accelerator.device)
    start = time.perf_counter()
    model.train()
    vision = train_vision(args, accelerator, model, heads, processor) if args.vision_steps else {}
    model.model.vision_tower.requires_grad_(bool(args.tower_lr)).eval()
    history: list[dict] = []
    language_steps = 0
    if not args.vision_only:
        cache = None if args.tower_lr else cache_tower(args, accelerator, model, processor)
        val = task.data.make_split("val", args.val_size) if args.eval_every and args.val_size else []
        language_steps = train_language(args, accelerator, model, heads, processor, cache, val, history)
        model.requires_grad_(True).eval().set_attn_implementation("sdpa")
        model.to(getattr(torch, args.save_dtype))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    torch.save({k: v.float().cpu() for k, v in heads.state_dict().items()}, out / HEADS_FILE)
    report = write_report(args, {"parameters": n_params, "train_minutes": (time.perf_counter() - start) / 60,
                                 "vision_stage": vision, "language_steps": language_steps,
                                 "patch_heads": describe_restored(heads_restored, len(heads.heads)),
                                 "history": history}, str(accelerator.device))
    return report


def write_report(args: argparse.Namespace, results: dict, device: str) -> dict:
    """Write ``--out``/training_report.json: the arguments, ``results``, the loss terms, the machine, and the report
    of the ``--init`` checkpoint this run continued (so a chain of runs keeps every run's loss terms)."""
    init = None
    if args.init and (Path(args.init) / "training_report.json").is_file():
        init = json.loads((Path(args.init) / "training_report.json").read_text())
    report = {
        "args": vars(args), **results, "loss_terms": loss_terms(args, args.vision_only),
        "machine": f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, {device}".strip(),
        "init": init,
    }
    (Path(args.out) / "training_report.json").write_text(json.dumps(report, indent=1))
    return report


def test_report(args: argparse.Namespace, report: dict) -> dict:
    """Reload the saved checkpoint as float32 and measure dense accuracy on the test split."""
    from vtoken.evals.shapes.evaluate import evaluate

    model, processor = load_shapes_model(args.out)
    result = evaluate(model, processor, TASKS[args.task].data.make_split("test", args.test_size), desc="test")
    report["test"] = {"accuracy": result.accuracy, "per_type": result.per_type, "n": result.n}
    report["disk_mb"] = sum(p.stat().st_size for p in Path(args.out).iterdir() if p.is_file()) / 2**20
    (Path(args.out) / "training_report.json").write_text(json.dumps(report, indent=1))
    print(f"test {result.summary()}")
    return report


# Tiny sizes for smoke tests (same image size and patch grid as the real model, so the processor matches).
TINY = {
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2),
}


def run(args: argparse.Namespace) -> int:
    report = train(args)
    if args.vision_only:
        accuracy = report["vision_stage"].get("patch_accuracy", {})
        print("stage 1 patch accuracy:", {k: round(v, 3) for k, v in accuracy.items()})
        return 0
    if args.test_size:
        report = test_report(args, report)
    print(f"trained {report['parameters'] / 1e6:.2f} M parameters in {report['train_minutes']:.1f} min "
          f"on {report['machine']}; saved to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtoken.evals.shapes.training", description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

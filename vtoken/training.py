"""Train a TokenFLEX projector on a LLaVA: ``vtoken train-tokenflex`` and :func:`train_tokenflex`.

Every step draws one visual-token count N from a distribution (TokenFLEX's "dynamic token training"; default the
paper's {64: 0.2, 144: 0.3, 256: 0.5} moved to the model's grid by :func:`~vtoken.methods.tokenflex.scaled_counts`),
pools every view of the batch to N tokens, projects them with the token-adaptive projector and trains on the
answer tokens' cross-entropy. The vision tower is frozen; the LLM is frozen too unless ``train_llm`` (then it
trains at ``llm_lr``). The loss is the plain mean over answer tokens (the paper's weighting is not public).

A sample is one image view and one or more question turns packed into a single sequence
(``prefix + image + turn 1 + turn 2 + ...``): a 4-D mask lets every turn see the prefix, the image and itself only,
with positions restarting after the image, so each turn is trained on exactly the single-question prompt.

Runs on accelerate (``accelerate launch`` for several GPUs; one CPU or GPU without it). The data of every step is a
pure function of (seed, step, process), so a run resumed from a checkpoint continues exactly as if it had not
stopped. Checkpoints (``OUT/checkpoints/step-NNNNNN``) hold accelerate's state and a usable projector; the final
projector goes to ``OUT/projector`` (the folder ``vtoken.patch(model, "tokenflex", projector=...)`` takes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vtoken.checks import check_choice, check_float, check_int
from vtoken.methods.tokenflex import TokenFlexProjector, check_counts, scaled_counts

IGNORE = -100


@dataclass
class Sample:
    """One training sample: ``prefix`` ids before the image, then ``turns`` of (ids, labels) after it (labels
    ``-100`` where nothing is predicted). The view comes as ``features`` (L, C), what the model's projector reads
    (patch tokens of the selected vision layer, no [CLS]), or as ``pixel_values`` (C, H, W) for the frozen tower."""

    prefix: list[int]
    turns: list[tuple[list[int], list[int]]]
    features: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None


# Data: a sequence of samples (the trainer draws uniformly), or a callable (rng, batch_size) -> samples.
Data = Sequence[Sample] | Callable[[np.random.Generator, int], list[Sample]]


def packed_inputs(model, samples: Sequence[tuple[list[int], list]], features: Sequence[torch.Tensor]):
    """Packed, right-padded batch: ``inputs_embeds``, a 4-D additive attention mask, ``position_ids`` and ``labels``.

    Row i is ``prefix + features[i] + turn 1 + turn 2 + ...`` for ``samples[i] = (prefix, turns)``. Every turn sees
    the prefix and the image and, causally, itself, but no other turn, and its positions restart right after the
    image. Built with one embedding lookup and the mask on the features' device: per-turn lookups and a CPU-built
    (B, L, L) mask made this the slowest part of a training step on a GPU.
    """
    embed = model.get_input_embeddings()
    device = features[0].device
    heads = [len(prefix) + len(feats) for (prefix, _), feats in zip(samples, features)]
    length = max(head + sum(len(ids) for ids, _ in turns) for head, (_, turns) in zip(heads, samples))
    B = len(samples)
    ids = torch.zeros(B, length, dtype=torch.long)
    segment = torch.full((B, length), -1, dtype=torch.long)  # 0: prefix and image, k: turn k, -1: padding
    positions = torch.zeros(B, length, dtype=torch.long)
    labels = torch.full((B, length), IGNORE, dtype=torch.long)
    for i, ((prefix, turns), head) in enumerate(zip(samples, heads)):
        ids[i, : len(prefix)] = torch.tensor(prefix)
        segment[i, :head] = 0
        positions[i, :head] = torch.arange(head)
        start = head
        for k, (turn_ids, turn_labels) in enumerate(turns, 1):
            n = len(turn_ids)
            ids[i, start : start + n] = torch.tensor(turn_ids)
            labels[i, start : start + n] = torch.tensor(turn_labels)
            segment[i, start : start + n] = k
            positions[i, start : start + n] = torch.arange(head, head + n)
            start += n
    segment = segment.to(device)
    embeds = embed(ids.to(device)).masked_fill((segment < 0)[..., None], 0.0)
    for i, ((prefix, _), feats) in enumerate(zip(samples, features)):
        embeds[i, len(prefix) : len(prefix) + len(feats)] = feats.to(embeds.dtype)
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed = causal & ((query == key) | (key == 0)) & (query >= 0)
    allowed |= torch.eye(length, dtype=torch.bool, device=device) & (query < 0)  # padding rows see themselves: no NaN
    mask = torch.zeros(B, 1, length, length, dtype=embeds.dtype, device=device)
    mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(embeds.dtype).min)
    return embeds, mask, positions.to(device), labels.to(device)


def param_groups(modules, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters of ``modules``: matrices decay, biases / norms / embeddings do not."""
    named = [(n, p) for m in modules for n, p in m.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    return [{"params": decay, "weight_decay": weight_decay, "lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr}]


def warmup_cosine(step: int, warmup: int, steps: int) -> float:
    """The learning-rate factor at ``step``: linear from 0 over ``warmup`` steps, then a cosine to 0 at ``steps``."""
    if step < warmup:
        return step / max(1, warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def optimizer_for(groups: list[dict], warmup: int, steps: int | Callable[[], int]):
    """AdamW on ``groups`` with a linear warm-up then cosine decay over ``steps``: a number, or a callable read at
    every step, for a run whose length is fitted to a time limit once its speed is known."""
    horizon = steps if callable(steps) else (lambda: steps)
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, min(warmup, horizon() // 2), horizon()))
    return optimizer, schedule


@dataclass
class TrainConfig:
    """What :func:`train_tokenflex` does. ``token_counts``: {N: weight} drawn once per step (None: the paper's
    distribution scaled to the model's grid); ``{36: 1.0}`` trains a fixed-N projector."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    token_counts: dict[int, float] | None = None
    hidden_ratio: int = 3
    align_steps: int = 0  # steps regressing the model's own projector on the full grid first (no LLM)
    train_llm: bool = False
    llm_lr: float = 2e-5
    save_every: int = 250  # 0: a checkpoint only at the end
    seed: int = 0
    mixed_precision: str = "no"
    cpu: bool = False
    progress: bool = True

    def __post_init__(self):
        for arg, low in (("steps", 1), ("batch_size", 1), ("warmup", 0), ("save_every", 0), ("seed", 0),
                         ("hidden_ratio", 1), ("align_steps", 0)):
            check_int(getattr(self, arg), arg, low)
        for arg in ("lr", "llm_lr"):
            check_float(getattr(self, arg), arg, 0.0, math.inf, low_open=True, high_open=True)
        check_float(self.weight_decay, "weight_decay", 0.0, math.inf, high_open=True)
        check_float(self.grad_clip, "grad_clip", 0.0, math.inf, high_open=True)
        check_choice(self.mixed_precision, "mixed_precision", ("no", "fp16", "bf16"))
        if self.token_counts is not None:
            self.token_counts = check_counts(self.token_counts)


@dataclass
class TrainResult:
    projector: TokenFlexProjector
    history: list[dict] = field(default_factory=list)  # per step: loss, N
    out: Path | None = None
    cpu_seconds: float = 0.0  # process CPU time of this run (all threads), resumed steps excluded
    align_losses: list[float] = field(default_factory=list)  # relative squared error per alignment step
    resumed_at: int = 0  # the step this run started from


def draw_count(counts: dict[int, float], seed: int, step: int) -> int:
    """The step's token count: the same in every process, independent of the batch's draw."""
    rng = np.random.default_rng([seed, step, 0])
    values = list(counts)
    return int(values[rng.choice(len(values), p=list(counts.values()))])


def draw_batch(data: Data, seed: int, step: int, process: int, batch_size: int, stream: int = 1) -> list[Sample]:
    rng = np.random.default_rng([seed, step, stream, process])
    if callable(data):
        return list(data(rng, batch_size))
    if len(data) == 0:
        raise ValueError("the training data holds no samples")
    return [data[int(i)] for i in rng.choice(len(data), size=batch_size, replace=len(data) < batch_size)]


def view_features(model, samples: list[Sample], device) -> torch.Tensor:
    """(B, L, C) what the model's projector would read for each sample's view (the tower is frozen)."""
    from vtoken.adapters import _compat

    if all(s.features is not None for s in samples):
        return torch.stack([s.features for s in samples]).to(device).float()
    if any(s.pixel_values is None for s in samples):
        raise ValueError("every Sample needs features (L, C) or pixel_values (C, H, W)")
    pixels = torch.stack([s.pixel_values for s in samples]).to(device, model.dtype)
    with torch.no_grad():
        return _compat.vision_features(model.model, pixels, model.config.vision_feature_layer,
                                       model.config.vision_feature_select_strategy).float()


def align_to_host(projector: TokenFlexProjector, model, data: Data, config: TrainConfig, native: int, device,
                  progress: bool) -> list[float]:
    """A short alignment stage: the projector regresses the model's own projector on the full patch grid (squared
    error relative to the target's variance), so the LLM-side training starts from features the frozen LLM can
    already read. Cheap (no LLM pass); the same in every process, so data-parallel copies start equal."""
    from tqdm.auto import tqdm

    from vtoken.adapters import _compat

    target_projector = _compat.projector_of(model.model)
    projector.to(device).train()
    optimizer = torch.optim.AdamW(projector.parameters(), lr=config.lr, weight_decay=0.0)
    losses = []
    for step in tqdm(range(config.align_steps), desc="align to the model's projector", unit="step",
                     disable=not progress):
        features = view_features(model, draw_batch(data, config.seed, step, 0, config.batch_size, stream=2), device)
        with torch.no_grad():
            target = target_projector(features.to(model.dtype)).float()
        loss = F.mse_loss(projector(features, native).float(), target) / target.var()
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(projector.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


class _Progress:
    """The trainer's position, saved in every checkpoint with accelerate's own state."""

    def __init__(self):
        self.step, self.history = 0, []

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history = state["step"], state["history"]


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*"))


# Config fields a resumed run may change: they do not alter what the steps compute.
RESUMABLE_CHANGES = {"save_every", "progress", "cpu"}


def train_tokenflex(model, data: Data, config: TrainConfig | None = None, out: str | os.PathLike | None = None,
                    projector: TokenFlexProjector | None = None, resume: bool = False) -> TrainResult:
    """Train a TokenFLEX projector for ``model`` (HF LLaVA) on ``data``; returns it with the loss history.

    ``projector``: start from this one (default: a fresh one, seeded). ``out``: where checkpoints and the final
    projector go (None: nothing is written). ``resume``: continue from the newest checkpoint under ``out``.
    LLaVA-NeXT: samples are single views (pass ``features``, e.g. the thumbnail's); its AnyRes tiles get the same
    projector per view at inference.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from vtoken.adapters.bridges.llava_tokenflex import check_projector, feature_widths, trainable_native_tokens

    config = config or TrainConfig()
    native = trainable_native_tokens(model)
    counts = check_counts(config.token_counts or scaled_counts(native), native)
    out = Path(out) if out is not None else None
    if resume and (out is None or not checkpoints(out)):
        raise ValueError(f"resume=True but there is no checkpoint under {out}/checkpoints to resume from")
    accelerator = Accelerator(cpu=config.cpu, mixed_precision=config.mixed_precision)
    cpu_start = time.process_time()
    torch.manual_seed(config.seed)
    vision_width, llm_width = feature_widths(model.config)
    if projector is None:
        projector = TokenFlexProjector(vision_width, llm_width, config.hidden_ratio)
    check_projector(projector, model.config)
    model.requires_grad_(False)
    model.to(accelerator.device)
    align_losses = []
    if config.align_steps and not resume:
        align_losses = align_to_host(projector, model, data, config, native, accelerator.device,
                                     config.progress and accelerator.is_local_main_process)
    groups = param_groups([projector], config.lr, config.weight_decay)
    llm = [model.model.language_model, model.lm_head]
    if config.train_llm:
        for module in llm:
            module.requires_grad_(True)
        groups += param_groups(llm, config.llm_lr, config.weight_decay)
    optimizer, scheduler = optimizer_for(groups, config.warmup, config.steps)
    progress = _Progress()
    accelerator.register_for_checkpointing(progress)
    host = model  # unwrapped: embeddings and the vision tower are read from it
    if config.train_llm:
        model, projector, optimizer, scheduler = accelerator.prepare(model, projector, optimizer, scheduler)
    else:
        projector, optimizer, scheduler = accelerator.prepare(projector, optimizer, scheduler)
    settings = {**dataclasses.asdict(config), "token_counts": counts}
    if resume:
        check_resumable(out, settings)
        accelerator.load_state(str(checkpoints(out)[-1]))
    elif out is not None and accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(settings, indent=1))
    model.train(config.train_llm)
    projector.train()
    resumed_at = progress.step
    bar = tqdm(range(progress.step, config.steps), initial=progress.step, total=config.steps, unit="step",
               desc="train-tokenflex", disable=not (config.progress and accelerator.is_local_main_process))
    for step in bar:
        num_tokens = draw_count(counts, config.seed, step)
        samples = draw_batch(data, config.seed, step, accelerator.process_index, config.batch_size)
        with accelerator.autocast():
            visual = projector(view_features(host, samples, accelerator.device), num_tokens)
            embeds, mask, positions, labels = packed_inputs(host, [(s.prefix, s.turns) for s in samples], visual)
            logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE)
        accelerator.backward(loss)
        if config.grad_clip:
            accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step = step + 1
        progress.history.append({"step": step + 1, "num_tokens": num_tokens, "loss": loss.item()})
        recent = [h["loss"] for h in progress.history[-20:]]
        bar.set_postfix(N=num_tokens, loss=f"{sum(recent) / len(recent):.3f}")
        if out is not None and (progress.step == config.steps or
                                (config.save_every and progress.step % config.save_every == 0)):
            save_checkpoint(accelerator, projector, out, progress.step)
    bar.close()
    trained = accelerator.unwrap_model(projector).eval()
    result = TrainResult(trained, progress.history, out, time.process_time() - cpu_start, align_losses, resumed_at)
    if out is not None and accelerator.is_main_process:
        trained.save(out / "projector")
        if config.train_llm:
            host.save_pretrained(out / "model")
    accelerator.wait_for_everyone()
    host.eval()
    return result


def save_checkpoint(accelerator, projector, out: Path, step: int) -> None:
    path = out / "checkpoints" / f"step-{step:06d}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        accelerator.unwrap_model(projector).save(path / "projector")


def check_resumable(out: Path, settings: dict) -> None:
    saved = json.loads((out / "train_config.json").read_text())
    saved["token_counts"] = {int(k): v for k, v in saved["token_counts"].items()}
    changed = sorted(k for k in settings if k not in RESUMABLE_CHANGES and saved.get(k) != settings[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {settings[k]!r}" for k in changed)
        raise ValueError(f"cannot resume {out}: the run was started with other settings ({diffs}); resume with the "
                         "same settings or start a new --out")


# ------------------------------------------------------------------------------------------------ JSONL data
class JsonlData(Sequence):
    """Samples from a JSONL file, one row per image: ``{"image": "a.png", "prompt": "USER: <image>\\nWhat colour?
    ASSISTANT:", "answer": "red", "turns": [{"prompt": "...", "answer": "..."}]}`` (``turns`` optional: more
    questions about the same image, each seeing the image and itself). Image paths are relative to the file.
    The prompt holds the processor's image token once; answers are tokenized as written, then end with EOS."""

    MAX_REPORTED = 20  # bad lines listed in one error; the rest are counted

    def __init__(self, path: str | os.PathLike, processor):
        self.path, self.processor = Path(path), processor
        if not self.path.is_file():
            raise ValueError(f"data={str(self.path)!r} is not a file")
        try:
            lines = self.path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"data={str(self.path)!r} cannot be read as text: {error}") from None
        self.rows, problems = [], []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            row, problem = self.check_line(line)
            if problem:
                problems.append(f"line {number}: {problem}")
            else:
                self.rows.append((number, row))
        if problems:  # the whole file is checked before anything is trained or written
            shown = problems[: self.MAX_REPORTED]
            more = len(problems) - len(shown)
            raise ValueError(f"{self.path}: {len(problems)} bad line(s), nothing trained:\n  " + "\n  ".join(shown)
                             + (f"\n  ... and {more} more" if more else ""))
        if not self.rows:
            raise ValueError(f"{self.path} holds no samples")

    def check_line(self, line: str) -> tuple[dict | None, str | None]:
        """(the row, None) or (None, what is wrong with it)."""
        from PIL import Image, UnidentifiedImageError

        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            return None, f"not JSON ({error.msg} at column {error.colno})"
        if not isinstance(row, dict):
            return None, f"expected a JSON object with image, prompt and answer; got a {type(row).__name__}"
        missing = [key for key in ("image", "prompt", "answer") if not isinstance(row.get(key), str)]
        if missing:
            return None, f"needs string fields image, prompt and answer; missing or not a string: {', '.join(missing)}"
        token = self.processor.image_token
        found = row["prompt"].count(token)
        if found != 1:
            return None, f"the prompt must hold the image token {token!r} exactly once; it holds it {found} times"
        turns = row.get("turns", [])
        if not isinstance(turns, list):
            return None, f"turns must be a list of objects with prompt and answer; got a {type(turns).__name__}"
        for k, extra in enumerate(turns, 1):
            if not isinstance(extra, dict) or not all(isinstance(extra.get(key), str) for key in ("prompt", "answer")):
                return None, f"turn {k} needs string fields prompt and answer"
        image = self.path.parent / row["image"]
        try:
            with Image.open(image):  # reads the header: a missing, unreadable or non-image file fails here
                pass
        except FileNotFoundError:
            return None, f"image {row['image']!r} not found (looked for {image})"
        except (OSError, UnidentifiedImageError) as error:
            return None, f"image {row['image']!r} cannot be read: {error}"
        return row, None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        from PIL import Image

        number, row = self.rows[index]
        tokenizer = self.processor.tokenizer
        try:
            image = Image.open(self.path.parent / row["image"]).convert("RGB")
        except OSError as error:  # a file whose header read but whose pixels do not (truncated)
            raise ValueError(f"{self.path} line {number}: image {row['image']!r} cannot be read: {error}") from None
        enc = self.processor(images=[image], text=[row["prompt"]], return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        image_id = tokenizer.convert_tokens_to_ids(self.processor.image_token)
        where = [i for i, t in enumerate(ids) if t == image_id]
        if not where or where[-1] - where[0] + 1 != len(where):
            raise ValueError(f"{self.path} line {number}: the prompt must hold the image token "
                             f"{self.processor.image_token!r} exactly once")

        def turn(prompt_ids: list[int], answer: str) -> tuple[list[int], list[int]]:
            reply = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
            return prompt_ids + reply, [IGNORE] * len(prompt_ids) + reply

        turns = [turn(ids[where[-1] + 1 :], row["answer"])]
        for extra in row.get("turns", []):
            turns.append(turn(tokenizer.encode(extra["prompt"], add_special_tokens=False), extra["answer"]))
        return Sample(ids[: where[0]], turns, pixel_values=enc["pixel_values"][0])


# ------------------------------------------------------------------------------------------------ command line
def token_counts_arg(text: str) -> dict[int, float]:
    """``64:0.2,144:0.3,256:0.5`` (or ``36`` for one fixed count) -> {64: 0.2, ...}."""
    counts = {}
    try:
        for item in text.split(","):
            count, _, weight = item.partition(":")
            counts[int(count)] = float(weight) if weight else 1.0
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected COUNT[:WEIGHT],... e.g. 64:0.2,144:0.3,256:0.5; got {text!r}") \
            from error
    try:
        return check_counts(counts)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.add_argument("--model", required=True, help="a saved HF LLaVA (folder with the model and its processor)")
    parser.add_argument("--data", required=True, help="JSONL training data (see the docs: image, prompt, answer)")
    parser.add_argument("--out", required=True, help="folder for checkpoints and the trained projector")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="samples per step and process")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="projector learning rate")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="linear warm-up steps, then cosine")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    parser.add_argument("--token-counts", type=token_counts_arg, default=None,
                        help="COUNT:WEIGHT,... drawn once per step (default: the paper's 64:0.2,144:0.3,256:0.5 "
                             "scaled to the model's patch grid); one COUNT trains a fixed-N projector")
    parser.add_argument("--align-steps", type=int, default=defaults.align_steps,
                        help="first regress the model's own projector on the full grid for N steps (no LLM pass)")
    parser.add_argument("--train-llm", action="store_true", help="train the LLM too (saved to OUT/model)")
    parser.add_argument("--llm-lr", type=float, default=defaults.llm_lr, help="LLM learning rate with --train-llm")
    parser.add_argument("--init", help="start from this saved projector instead of a fresh one")
    parser.add_argument("--save-every", type=int, default=defaults.save_every,
                        help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint under --out")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seeds the projector and every step's data")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                        help="accelerate's autocast (GPU)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where accelerate finds a GPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vtoken.cli import UsageError, usage_errors

    if args.threads:
        torch.set_num_threads(args.threads)
    with usage_errors():
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                             weight_decay=args.weight_decay, token_counts=args.token_counts, train_llm=args.train_llm,
                             align_steps=args.align_steps,
                             llm_lr=args.llm_lr, save_every=args.save_every, seed=args.seed,
                             mixed_precision=args.mixed_precision, cpu=args.cpu, progress=not args.quiet)
        if not (Path(args.model) / "config.json").is_file():
            raise UsageError(f"--model {args.model}: not a saved model folder (no config.json)")
        processor = AutoProcessor.from_pretrained(args.model)
        model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
        data = JsonlData(args.data, processor)
        init = TokenFlexProjector.load(args.init) if args.init else None
        result = train_tokenflex(model, data, config, out=args.out, projector=init, resume=args.resume)
    if config.train_llm:
        processor.save_pretrained(Path(args.out) / "model")
    losses = [h["loss"] for h in result.history]
    tail = losses[-max(1, len(losses) // 10):]
    print(f"trained {len(result.history) - result.resumed_at} steps (to step {len(result.history)}, "
          f"{result.cpu_seconds:.0f} s CPU time in this run); "
          f"mean loss of the last {len(tail)}: {sum(tail) / len(tail):.4f}; projector saved to "
          f"{Path(args.out) / 'projector'}")
    return 0

"""lmms-eval model ``vtoken``: a Hugging Face LLaVA, LLaVA-NeXT, LLaVA-OneVision or Qwen-VL with any vtoken method
applied.

    python -m lmms_eval eval --model vtoken --tasks mme \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=todre,keep=64,dtype=float16

lmms-eval finds the model through the ``lmms_eval.models`` entry point (``manifest`` below), so installing
vtoken with its ``eval`` extra is all it takes. ``model_args`` are the loader's arguments (``MODEL_ARGS``) plus
any field of the chosen method's config (``vtoken methods --verbose``); ``method=none`` runs the dense model.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

import vtoken
from vtoken.evals.common.arguments import DTYPES
from vtoken.evals.common.literals import parse_literal

MODEL_ID = "vtoken"
DENSE = ("none", "dense")
LOGLIKELIHOOD_SCORES = ("mean_loss", "sum_logprob")
# gen_kwargs handed to ``generate`` as they are; the others that lmms-eval knows are handled by name below.
PASSED_GEN_KWARGS = ("num_beams", "top_p", "top_k", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
                     "min_new_tokens")
MODEL_ARGS = {
    "pretrained": "HF id or local path of a LLaVA, LLaVA-NeXT, LLaVA-OneVision or Qwen-VL checkpoint with its "
                  "processor (required)",
    "method": "a registered vtoken method, or none / dense for the unpatched model (default none)",
    "device": "cpu, cuda, cuda:1, ... (default: cuda if available; under accelerate launch, each process's GPU)",
    "device_map": "passed to from_pretrained to shard one model over several GPUs (e.g. auto); single process only",
    "dtype": "auto, float32, float16 or bfloat16 (default auto: the checkpoint's dtype)",
    "attn_implementation": "sdpa, eager, flash_attention_2, ... (default sdpa)",
    "batch_size": "requests per forward / generate call (default 1)",
    "max_new_tokens": "generation length when the task sets none (default 256)",
    "loglikelihood": "mean_loss (default; lmms-eval's convention, multiple_choice takes the argmin) or sum_logprob",
    "stats_path": "JSON file updated after every batch with visual-token counts (.rank<N> added per process)",
    "trust_remote_code": "passed to from_pretrained (default false)",
}


def manifest():
    """Entry point of the ``lmms_eval.models`` group."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VTokenLMM")


def split_model_args(method: str, kwargs: dict) -> dict:
    """The method's config from the leftover model_args; anything else is an error that lists what is valid."""
    fields = [] if method in DENSE else list(vtoken.methods()[method].fields())
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        where = f"fields of method {method!r}: {', '.join(fields)}" if fields else f"method {method!r} takes none"
        raise ValueError(
            f"--model {MODEL_ID}: unknown model_args {', '.join(map(repr, unknown))}; valid: "
            f"{', '.join(MODEL_ARGS)}; {where}"
        )
    return {k: parse_literal(v) if isinstance(v, str) else v for k, v in kwargs.items()}


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
        raise ValueError(f"--model {MODEL_ID}: {name} must be a positive integer, got {value!r}")
    return int(value)


def flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false", "1", "0"):
        return str(value).lower() in ("true", "1")
    raise ValueError(f"--model {MODEL_ID}: {name} must be true or false, got {value!r}")


def truncate_at(text: str, until: list[str]) -> str:
    """The text before the first stop sequence (``generate`` may overshoot it within a token)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class StopOnStrings(StoppingCriteria):
    """Ends a row of ``generate`` once the text it has generated contains a stop string.

    HF's ``stop_strings`` option builds per-token string tables from the vocabulary and raises on tokenizers whose
    tokens do not decode to substrings of their concatenation (word-level ones, such as ShapesVQA's). Decoding the
    last few generated tokens works with any tokenizer; the window covers a stop string even when every character
    is a byte-fallback token (up to 4 per character).
    """

    def __init__(self, tokenizer, stops: list[str], prompt_length: int):
        self.tokenizer, self.stops, self.prompt_length = tokenizer, [s for s in stops if s], prompt_length
        self.window = 4 * max((len(s) for s in self.stops), default=0) + 8

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_length :][:, -self.window :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


@dataclass
class TokenTally:
    """Visual tokens over a whole run, summed over samples, so per-process files can be added up."""

    samples: int = 0
    prefills: int = 0
    visual_tokens_input: int = 0  # image placeholders in the processed prompts (the dense count)
    visual_tokens_llm: int = 0  # entering the LLM, after boundary pruning
    visual_tokens_layer_mean: float = 0.0  # per sample: mean over decoder layers (in-LLM pruning lowers it)
    selection_time_s: float = 0.0
    scoring_time_s: float = 0.0

    def add(self, dense: list[int], llm: list[int], layer_mean: list[float], stats) -> None:
        self.samples += len(dense)
        self.prefills += 1
        self.visual_tokens_input += sum(dense)
        self.visual_tokens_llm += sum(llm)
        self.visual_tokens_layer_mean += sum(layer_mean)
        if stats is not None:
            self.selection_time_s += stats.selection_time_s
            self.scoring_time_s += stats.scoring_time_s


class VTokenLMM(lmms):
    """lmms-eval "simple" model: prompts are built from the task's text plus its images (see ``prompt``)."""

    is_simple = True

    def __init__(self, pretrained=None, method="none", device=None, device_map=None, dtype="auto",
                 attn_implementation="sdpa", batch_size=1, max_new_tokens=256, loglikelihood="mean_loss",
                 stats_path=None, trust_remote_code=False, **method_args) -> None:
        super().__init__()
        from accelerate import Accelerator
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if pretrained is None or pretrained == "":
            raise ValueError(f"--model {MODEL_ID}: model_args needs pretrained=<HF id or local path>")
        method = "none" if method is None else str(method)
        if method not in DENSE and method not in vtoken.methods():
            raise ValueError(f"--model {MODEL_ID}: unknown method {method!r}; use none, dense or one of "
                             f"{', '.join(sorted(vtoken.methods()))}")
        self.method_config = split_model_args(method, method_args)
        if str(dtype) not in ("auto", *DTYPES):
            raise ValueError(f"--model {MODEL_ID}: dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
        if loglikelihood not in LOGLIKELIHOOD_SCORES:
            raise ValueError(f"--model {MODEL_ID}: loglikelihood must be one of {', '.join(LOGLIKELIHOOD_SCORES)}; "
                             f"got {loglikelihood!r}")
        self.batch_size_per_gpu = positive_int(batch_size, "batch_size")
        self.max_new_tokens = positive_int(max_new_tokens, "max_new_tokens")
        self.loglikelihood_score = loglikelihood
        self.stats_path = stats_path
        self.method = method

        # Data parallel (accelerate launch or torchrun): one full copy per process, requests split by rank.
        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:
            if device_map is not None:
                raise ValueError(f"--model {MODEL_ID}: device_map shards one model over GPUs in a single process; "
                                 "under accelerate launch every process loads its own copy: drop device_map")
            self._device = self.accelerator.device
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

        trust = flag(trust_remote_code, "trust_remote_code")
        self._model = AutoModelForImageTextToText.from_pretrained(
            str(pretrained), dtype=DTYPES.get(str(dtype), "auto"), attn_implementation=attn_implementation,
            device_map=device_map, trust_remote_code=trust,
        ).eval()
        if device_map is None:
            self._model.to(self._device)
        else:
            self._device = self._model.device
        self.processor = AutoProcessor.from_pretrained(str(pretrained), trust_remote_code=trust)
        self.tokenizer.padding_side = "left"  # batched generation reads the last column of every row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.image_token = getattr(self.processor, "image_token", None) or "<image>"
        self.handle = None if method in DENSE else vtoken.patch(self._model, method, **self.method_config)
        self.tally = TokenTally()
        self.ignored_gen_kwargs: set[str] = set()

    # -- what lmms-eval reads --------------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # -- prompts and inputs ----------------------------------------------------------------------------------
    def prompt(self, context: str, n_images: int) -> str:
        """The processor's chat template when it has one, else LLaVA-1.5's ``USER: <image>\\n{context} ASSISTANT:``.

        Images go before the text, one placeholder each, unless the task's context already places them.
        """
        placed = context.count(self.image_token)
        if placed not in (0, n_images):
            raise ValueError(f"the task's prompt holds {placed} {self.image_token!r} placeholders for {n_images} "
                             "images; it must hold none (vtoken puts them first) or one per image")
        images = 0 if placed else n_images
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}] * images + [{"type": "text", "text": context}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False)
        return f"USER: {f'{self.image_token}{chr(10)}' * images}{context} ASSISTANT:"

    def visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        found = doc_to_visual(self.task_dict[task][split][doc_id])
        flat, stack = [], list(reversed(found if isinstance(found, (list, tuple)) else [found]))
        while stack:
            item = stack.pop()
            if isinstance(item, (list, tuple)):
                stack.extend(reversed(item))
            elif item is not None:
                flat.append(item)
        from PIL import Image

        for item in flat:
            if not isinstance(item, Image.Image):
                raise ValueError(f"--model {MODEL_ID} evaluates image tasks; task {task!r} gave a "
                                 f"{type(item).__name__} visual ({str(item)[:80]!r}), e.g. a video or audio file")
        return [im.convert("RGB") for im in flat]

    def encode(self, texts: list[str], images: list[list]) -> dict:
        flat = [im for row in images for im in row]
        inputs = self.processor(text=texts, images=flat or None, padding=True, return_tensors="pt")
        return inputs.to(self.device, self.model.dtype)  # casts floating tensors (pixels) only

    def record(self, inputs) -> list[int]:
        """Count this call's visual tokens (``stats_path`` gets the running totals); returns, per row, the prompt
        tokens that entered the LLM (after boundary pruning), which lmms-eval logs as each sample's input tokens."""
        dense = (inputs["input_ids"] == self.model.config.image_token_id).sum(1).tolist()
        stats = None if self.handle is None else self.handle.stats
        if stats is None:
            llm, layer_mean = dense, dense
        else:  # generate() prefills each row once per beam (copies side by side): count every row once
            rows = range(0, len(stats.visual_tokens_llm), max(1, len(stats.visual_tokens_llm) // len(dense)))
            layers = stats.visual_tokens_per_layer or [stats.visual_tokens_llm]
            llm = [stats.visual_tokens_llm[i] for i in rows]
            layer_mean = [sum(layer[i] for layer in layers) / len(layers) for i in rows]
        self.tally.add(dense, llm, layer_mean, stats)
        if self.stats_path:
            path = str(self.stats_path)
            if self.world_size > 1:
                root, ext = os.path.splitext(path)
                path = f"{root}.rank{self.rank}{ext}"
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                json.dump({"method": self.method, "config": self.method_config, **asdict(self.tally)}, f, indent=1)
        real = inputs["attention_mask"].sum(1).tolist()
        return [r - d + v for r, d, v in zip(real, dense, llm)]

    def batches(self, items: list[tuple], key) -> list[list[int]]:
        """Indices grouped by ``key`` (e.g. gen_kwargs), longest first inside a group, cut to batch_size."""
        groups = defaultdict(list)
        for i, item in enumerate(items):
            groups[key(item)].append(i)
        out = []
        for indices in groups.values():
            indices.sort(key=lambda i: (-len(items[i][1]), -len(items[i][0])))
            out += [indices[s : s + self.batch_size] for s in range(0, len(indices), self.batch_size)]
        return out

    # -- lmms-eval requests ----------------------------------------------------------------------------------
    def generate_until(self, requests) -> list[GenerationResult]:
        items = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            images = self.visuals(doc_to_visual, doc_id, task, split)
            items.append((self.prompt(context, len(images)), images, dict(gen_kwargs or {}), context))
        results: list[GenerationResult | None] = [None] * len(items)
        bar = tqdm(total=len(items), disable=self.rank != 0, desc="vtoken generate_until")
        for batch in self.batches(items, key=lambda it: json.dumps(it[2], sort_keys=True, default=str)):
            outputs = self.generate([items[i][0] for i in batch], [items[i][1] for i in batch], items[batch[0]][2])
            for i, out in zip(batch, outputs):
                results[i] = out
                self.cache_hook.add_partial("generate_until", (items[i][3], items[i][2]), out.text)
            bar.update(len(batch))
        bar.close()
        return results

    def generate(self, prompts: list[str], images: list[list], gen_kwargs: dict) -> list[GenerationResult]:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new_tokens = positive_int(kwargs.pop("max_new_tokens", None) or self.max_new_tokens, "max_new_tokens")
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = flag(kwargs.pop("do_sample", False), "do_sample")
        # Greedy unless asked to sample; temperature 0 means argmax whatever do_sample says.
        sample = temperature > 0 or (do_sample and "temperature" not in gen_kwargs)
        options = {k: kwargs.pop(k) for k in PASSED_GEN_KWARGS if k in kwargs}
        if not sample:
            options = {k: v for k, v in options.items() if k not in ("top_p", "top_k")}
        elif temperature > 0:
            options["temperature"] = temperature
        new_ignored = set(kwargs) - self.ignored_gen_kwargs
        if new_ignored:
            logger.warning(f"vtoken: ignoring gen_kwargs {sorted(new_ignored)} (generate takes {PASSED_GEN_KWARGS}, "
                           "until, max_new_tokens, temperature, do_sample)")
            self.ignored_gen_kwargs |= new_ignored
        inputs = self.encode(prompts, images)
        if any(until):
            stop = StopOnStrings(self.tokenizer, until, inputs["input_ids"].shape[1])
            options["stopping_criteria"] = StoppingCriteriaList([stop])
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=sample,
                                      pad_token_id=self.tokenizer.pad_token_id, **options)
        input_tokens = self.record(inputs)
        new = out[:, inputs["input_ids"].shape[1] :]
        ended = (new == self.tokenizer.pad_token_id) | (new == self.tokenizer.eos_token_id)
        output_tokens = torch.where(ended.any(1), ended.int().argmax(1), new.shape[1]).tolist()
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [GenerationResult(truncate_at(t, until), TokenCounts(input_tokens=n_in, output_tokens=n_out))
                for t, n_in, n_out in zip(texts, input_tokens, output_tokens)]

    def loglikelihood(self, requests) -> list[GenerationResult]:
        """(score, is_greedy) of each continuation after its prompt, in ``GenerationResult.text``.

        The score is the mean negative log-likelihood per continuation token by default: that is what lmms-eval's
        own HF models return and what its ``multiple_choice`` scoring (argmin) expects. ``loglikelihood=sum_logprob``
        gives lm-eval's summed log-probability instead. The pair is wrapped because lmms-eval 0.7.3's evaluator
        turns a bare tuple into its string (``unwrap_generation_output``), which breaks every loglikelihood task.
        """
        items = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            images = self.visuals(doc_to_visual, doc_id, task, split)
            prompt = self.prompt(context, len(images))
            # Tokenize prompt and prompt+continuation alike, so a token merging across the seam stays counted once.
            n = len(self.tokenizer(prompt + continuation).input_ids) - len(self.tokenizer(prompt).input_ids)
            items.append((prompt + continuation, images, max(n, 0)))
        results: list[GenerationResult | None] = [None] * len(items)
        bar = tqdm(total=len(items), disable=self.rank != 0, desc="vtoken loglikelihood")
        for batch in self.batches(items, key=lambda it: 0):
            texts, images, lengths = zip(*(items[i] for i in batch))
            for i, score in zip(batch, self.score(list(texts), list(images), list(lengths))):
                results[i] = score
            bar.update(len(batch))
        bar.close()
        return results

    def score(self, texts: list[str], images: list[list], n_continuation: list[int]) -> list[GenerationResult]:
        """Read each row's continuation from the END of its logits: pruning shortens the sequence before it, and
        left padding aligns every row's last token."""
        inputs = self.encode(texts, images)
        width = max(n_continuation)
        with torch.inference_mode():
            logits = self.model(**inputs, use_cache=False, logits_to_keep=width + 1).logits
        input_tokens = self.record(inputs)
        logprobs = logits[:, :-1].float().log_softmax(-1)  # (B, width, V): predictions of the last `width` tokens
        targets = inputs["input_ids"][:, inputs["input_ids"].shape[1] - width :]
        token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        greedy = logprobs.argmax(-1) == targets
        out = []
        for row, n in enumerate(n_continuation):
            lp, hit = token_lp[row, width - n :], greedy[row, width - n :]
            if self.loglikelihood_score == "sum_logprob":
                value = float(lp.sum())
            else:
                value = float(-lp.mean()) if n else 0.0
            out.append(GenerationResult((value, bool(hit.all())), TokenCounts(input_tokens=input_tokens[row])))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            f"--model {MODEL_ID} does not support generate_until_multi_round tasks (multi-turn prompts that "
            "depend on earlier answers); run single-round image tasks"
        )

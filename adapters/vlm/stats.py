"""What a call did, recorded without stalling it: ``VLMStats`` of the last prefill, read from the device when
looked at."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vtoken.timing import Stopwatch


class OnRead:
    """A stats value that is read from the device only when someone looks at it: recording what a call did must not
    stall it (on a GPU every read of device data waits for the queue to drain)."""

    __slots__ = ("read",)

    def __init__(self, read: Callable[[], Any]):
        self.read = read


def settled(value):
    """``value`` with every :class:`OnRead` inside it (lists, tuples, dicts) read, and tensors in a record made
    lists."""
    if isinstance(value, OnRead):
        return settled(value.read())
    if isinstance(value, list):
        return [settled(v) for v in value]
    if isinstance(value, dict):
        return {k: settled(v) for k, v in value.items()}
    return value


def record_value(value):
    """A method's record entry as users read it: tensors become lists."""
    return value.tolist() if isinstance(value, torch.Tensor) else value


class VLMStats:
    """What the last prefill did. Lists are per image (``visual_tokens_in/kept``), per sample
    (``visual_tokens_llm``) or per decoder layer then per sample (``tokens_per_layer``).

    The adapter records into ``raw`` (device tensors behind :class:`OnRead`, stopwatches); a field is read from the
    device when a user first looks at it, so recording costs no sync.
    """

    FIELDS = dict(
        visual_tokens_in=list, visual_tokens_kept=list,
        kept_indices=list,  # per image: kept token indices (CPU tensor), None for synthesised tokens
        visual_tokens_llm=list, tokens_per_layer=list, visual_tokens_per_layer=list,
        tokens_per_frame=list,  # per item: kept tokens per frame (videos)
        records=dict,  # scoring layer -> a method's diagnostics (e.g. ToDRE's attention ratios)
        # layer -> per sample, the LLM-input positions of the visual tokens still alive from that layer on
        visual_alive=dict,
        notes=list,
    )

    def __init__(self):
        self.prefills = 0
        self.vision = None  # stats of a method running inside the vision tower (token_clustering), last call
        self.clear()

    def clear(self) -> None:
        self.raw = {name: kind() for name, kind in self.FIELDS.items()}
        self.selection, self.scoring = Stopwatch(), Stopwatch()

    def reset(self) -> None:
        """A new prefill: what the last one recorded goes."""
        self.clear()
        self.prefills += 1

    def __getattr__(self, name):
        raw = self.__dict__.get("raw")
        if raw is None or name not in raw:
            raise AttributeError(name)
        value = settled(raw[name])
        if name == "records":
            value = {layer: {k: record_value(v) for k, v in rec.items()} for layer, rec in value.items()}
        raw[name] = value
        return value

    def __setattr__(self, name, value):
        if name in self.FIELDS:
            self.raw[name] = value
        else:
            object.__setattr__(self, name, value)

    @property
    def selection_time_s(self) -> float:
        """Seconds in the boundary stage's selection (read at the first look; no sync during the call)."""
        return self.selection.seconds

    @property
    def scoring_time_s(self) -> float:
        """Seconds in the in-LLM scoring and observing; NaN when they ran inside a compiled decoder's graph."""
        return self.scoring.seconds

    def __repr__(self) -> str:
        shown = {name: getattr(self, name) for name in ("visual_tokens_in", "visual_tokens_kept", "visual_tokens_llm")}
        return f"VLMStats(prefills={self.prefills}, {', '.join(f'{k}={v}' for k, v in shown.items())})"

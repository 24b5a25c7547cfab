"""SVG2 sparse self-attention on the video-DiT hosts (Wan 2.1 / 2.2, HunyuanVideo), per model instance: their
attention stage.

What is patched (all undone by ``handle.remove()``):

* the ``processor`` attribute of every self-attention module of *this* transformer (Wan ``blocks[i].attn1``;
  Hunyuan ``transformer_blocks[i].attn`` and ``single_transformer_blocks[j].attn``, layers numbered on from the
  double-stream blocks). Cross-attention and Hunyuan's text refiner keep their processors. The SVG2 processor keeps
  the original one and hands it every dense call (dense warm-up steps and layers), so those are bit-exact;
* a forward pre-hook on the transformer that reads the ``timestep`` of each call, and an instance-level wrapper of
  ``transformer.cache_context`` (diffusers pipelines name their calls "cond" / "uncond" with it);
* for a pipeline, an instance-level wrapper of ``pipeline.check_inputs``, which every diffusers video pipeline calls
  first: it starts a new generation.

Where the denoising loop is: a call with the same timestep as the previous one is another CFG branch of the same step,
a smaller one is the next step, a larger one (or ``check_inputs``, or ``handle.reset()``) starts a new generation,
which drops every centroid cache. The branch is the ``cache_context`` name when a pipeline sets one, else the call's
ordinal within its step. Centroid caches are kept per transformer, per layer and per branch, so CFG branches never
warm-start from each other (the official code shares them and never resets them).

Under ``torch.compile`` that bookkeeping (the step, the branch, the centroid caches and the stats) stays on the host:
each of its methods is ``torch.compiler.disable``-d (``host_side``), so Dynamo never traces the caches. Traced, a
lookup of a centroid cache that missed on the first step stayed a miss on every later one (Dynamo, torch 2.11 to
2.15, guards no key that was absent after a graph break), and the compiled transformer silently restarted k-means
cold each step. The clustering, plan and attention between those calls are traced.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vtoken.adapters.video_dit import (
    HUNYUAN,
    WAN,
    from_heads,
    hunyuan_layers,
    hunyuan_qkv,
    is_class,
    to_heads,
    transformers_of,
    wan_layers,
    wan_qkv,
)
from vtoken.methods.svg2 import SVG2Config, check_cluster_count, step_clusters, svg2_attention
from vtoken.registry import add_bridge
from vtoken.timing import Stopwatch

# Dynamo prints the reason with each graph break it logs here, and in the error that ``fullgraph=True`` raises.
host_side = torch.compiler.disable(reason=(
    "vtoken's SVG2 keeps the denoising step, the CFG branch, the centroid caches and the stats on the host, and each "
    "attention call hands over to the host here, so the transformer cannot compile as one graph (fullgraph=True); "
    "compile it without fullgraph: torch.compile(transformer) or transformer.compile_repeated_blocks()"))

MAX_BRANCHES = 4  # calls beyond this many at one timestep (without a cache_context name) share the last branch


# -- stats --------------------------------------------------------------------------------------------------------


@dataclass
class SVG2CallStats:
    """One self-attention call. Dense calls have density 1 and no timings (they run the original processor)."""

    layer: int
    step: int
    branch: str
    dense: bool
    tokens: int
    density: float = 1.0
    kmeans_ms: float = 0.0
    plan_ms: float = 0.0
    attention_ms: float = 0.0


@dataclass
class SVG2Stats:
    """``handle.stats``: the calls of the current generation, ``last`` of them, and past generations' totals.

    ``generations`` counts the new generations started (by a pipeline call, the timestep going back up, or
    ``handle.reset()``); ``history`` holds the ``totals()`` of each finished one. Timings come from CUDA events on a
    GPU and wall time on a CPU; ``record_stats=False`` turns the per-call records off. A sparse call's density and
    times stay on the device until ``calls`` is read (one wait for every call since the last read), so recording
    never stalls the denoising loop.
    """

    generations: int = 0
    history: list[dict] = field(default_factory=list)
    _calls: list[SVG2CallStats] = field(default_factory=list, repr=False)
    _unread: list[tuple[SVG2CallStats, torch.Tensor, Stopwatch]] = field(default_factory=list, repr=False)

    @property
    def calls(self) -> list[SVG2CallStats]:
        if self._unread:
            densities = torch.stack([density for _, density, _ in self._unread]).tolist()
            for (call, _, watch), density in zip(self._unread, densities):
                laps = watch.laps()
                call.density, call.kmeans_ms, call.plan_ms, call.attention_ms = (
                    density, laps["kmeans"], laps["plan"], laps["attention"])
            self._unread.clear()
        return self._calls

    def add(self, call: SVG2CallStats, density: torch.Tensor | None = None, watch: Stopwatch | None = None) -> None:
        """Record a call; a sparse one's ``density`` (a 0-d tensor) and stage times (``watch``) are read later."""
        self._calls.append(call)
        if density is not None:
            self._unread.append((call, density.detach(), watch))

    @property
    def last(self) -> SVG2CallStats | None:
        calls = self.calls
        return calls[-1] if calls else None

    @property
    def sparse_calls(self) -> list[SVG2CallStats]:
        return [c for c in self.calls if not c.dense]

    def totals(self) -> dict:
        """This generation: call counts, summed k-means / plan / sparse-attention time, and mean densities (over
        sparse calls, as the paper reports them, and over all calls)."""
        calls, sparse = self.calls, self.sparse_calls
        return {
            "calls": len(calls),
            "sparse_calls": len(sparse),
            "dense_calls": len(calls) - len(sparse),
            "kmeans_ms": sum(c.kmeans_ms for c in calls),
            "plan_ms": sum(c.plan_ms for c in calls),
            "attention_ms": sum(c.attention_ms for c in sparse),
            "mean_sparse_density": sum(c.density for c in sparse) / len(sparse) if sparse else None,
            "mean_density": sum(c.density for c in calls) / len(calls) if calls else None,
        }

    def new_generation(self) -> None:
        if self._calls:
            self.history.append(self.totals())
        self._calls, self._unread = [], []
        self.generations += 1


# -- where the denoising loop is -----------------------------------------------------------------------------------


def _timestep_value(t) -> float | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.detach().float().max()) if t.numel() else None
    return float(t)


class SVG2Runtime:
    """State shared by the processors of one handle: the denoising position and the centroid caches."""

    def __init__(self, config: SVG2Config):
        self.config = config
        self.stats = SVG2Stats()
        self.caches: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.step = -1
        self.branch = "0"
        self.calls_this_step = 0
        self.last_timestep: float | None = None
        self.context_name: str | None = None
        self._checked_mask: tuple | None = None  # (weakref to a key mask, its version, video tokens, all valid)

    def new_generation(self) -> None:
        self.caches.clear()
        self.step, self.branch, self.calls_this_step, self.last_timestep = -1, "0", 0, None
        self.stats.new_generation()

    def begin_call(self, timestep: float | None) -> None:
        """A transformer call starts: advance the step / branch (see the module docstring)."""
        last = self.last_timestep
        if timestep is not None and last is not None and timestep > last:
            self.new_generation()
            last = None
        if timestep is None or timestep != last:
            self.step += 1
            self.calls_this_step = 0
        else:
            self.calls_this_step += 1
        self.last_timestep = timestep
        self.branch = self.context_name or str(min(self.calls_this_step, MAX_BRANCHES - 1))

    @host_side
    def pre_hook(self, module, args, kwargs):
        self.begin_call(_timestep_value(kwargs["timestep"] if "timestep" in kwargs else (args[1:2] or [None])[0]))

    def wrap_cache_context(self, original):
        @contextlib.contextmanager
        def cache_context(name, *args, **kwargs):
            previous, self.context_name = self.context_name, str(name)
            try:
                with original(name, *args, **kwargs):
                    yield
            finally:
                self.context_name = previous

        return cache_context

    # -- per attention call ----------------------------------------------------------------------------------------
    @host_side
    def begin_attention(self, layer: int, tokens: int, eligible: bool = True,
                        video_mask: torch.Tensor | None = None) -> str:
        """This call's mode: "dense" (original processor), "cluster" (dense, but k-means warms the cache) or
        "sparse"; a dense or cluster call is recorded here. One host call per attention call, so a compiled
        transformer breaks its graph once for a dense call.

        ``eligible``: False for a call SVG2 leaves to the original processor whatever the step (an unexpected
        layout). ``video_mask`` (B, 1, 1, N) is the call's key mask; a call whose video keys are not all valid stays
        dense. Cluster counts are checked against the video tokens on every call, dense ones included, so a bad
        setting fails at the first step rather than after the warm-up.
        """
        check_cluster_count(self.config.q_clusters, tokens, "q_clusters")
        check_cluster_count(self.config.k_clusters, tokens, "k_clusters")
        if not eligible or layer < self.config.dense_layers:
            mode = "dense"
        elif max(self.step, 0) < self.config.dense_steps:
            mode = "cluster" if self.config.kmeans_in_dense_steps else "dense"
        else:
            mode = "sparse"
        if mode != "dense" and video_mask is not None and not self._video_keys_valid(video_mask, tokens):
            mode = "dense"  # masked video tokens: not a layout SVG2 knows, leave the call to the original processor
        if mode != "sparse" and self.config.record_stats:
            self.stats.add(SVG2CallStats(layer, max(self.step, 0), self.branch, True, tokens))
        return mode

    def _video_keys_valid(self, mask: torch.Tensor, tokens: int) -> bool:
        """Whether the first ``tokens`` keys of ``mask`` are all valid. A transformer call hands every layer the same
        mask, so this reads the device once per call, not once per layer: the answer is kept for that tensor (by
        identity and by its version counter, which catches an in-place change; an inference tensor has none)."""
        version = None if mask.is_inference() else mask._version
        seen = self._checked_mask
        if seen is not None and seen[0]() is mask and seen[1:3] == (version, tokens):
            return seen[3]
        valid = bool(mask[..., :tokens].all())  # one read per transformer call: decides dense or sparse on the host
        self._checked_mask = (weakref.ref(mask), version, tokens, valid)
        return valid

    @host_side
    def _warm_start(self, key: tuple, q: torch.Tensor, k: torch.Tensor):
        """``(q centroids, k centroids, generator)``: this layer's and branch's centroids from the previous step, or
        None for a seeded start from the generator."""
        model_index, layer = key
        generator = torch.Generator(device=q.device).manual_seed(
            self.config.seed + 1_000_003 * model_index + 1009 * layer)
        cached = self.caches.get(key + (self.branch,))
        cfg = self.config
        expected = ((q.shape[0], cfg.q_clusters, q.shape[-1]), (k.shape[0], cfg.k_clusters, k.shape[-1]))
        if cached is None or tuple(c.shape for c in cached) != expected:
            return None, None, generator
        return *cached, generator

    @host_side
    def _keep_centroids(self, key: tuple, q_centroids: torch.Tensor, k_centroids: torch.Tensor) -> None:
        self.caches[key + (self.branch,)] = (q_centroids, k_centroids)

    def warm_clusters(self, key: tuple, q: torch.Tensor, k: torch.Tensor) -> None:
        """Dense step with ``kmeans_in_dense_steps``: run the k-means only, so sparse steps start warm."""
        cfg = self.config
        q_init, k_init, gen = self._warm_start(key, q, k)
        qc = step_clusters(q, cfg.q_clusters, cfg, q_init, gen)
        kc = step_clusters(k, cfg.k_clusters, cfg, k_init, gen)
        self._keep_centroids(key, qc.centroids, kc.centroids)

    def attend(self, key: tuple, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               extra_keys: torch.Tensor | None = None, dense_queries: int = 0) -> torch.Tensor:
        """Sparse attention of ``q`` (BH, N, D) over ``k``, ``v`` (BH, N [+ extra], D); updates the cache and stats.

        ``dense_queries``: query rows the caller computes densely elsewhere (Hunyuan text), for the density figure.
        """
        q_init, k_init, gen = self._warm_start(key, q, k)
        watch = Stopwatch(q.device, enabled=self.config.record_stats)
        result = svg2_attention(q, k, v, self.config, q_init, k_init, gen, extra_keys, watch)
        self._end_sparse(key, result, q.shape[1], dense_queries, watch)
        return result.out

    @host_side
    def _end_sparse(self, key: tuple, result, tokens: int, dense_queries: int, watch: Stopwatch) -> None:
        """Keep this call's centroids for the next step and record it: one host call after the sparse attention."""
        self._keep_centroids(key, result.q_clusters.centroids, result.k_clusters.centroids)
        if not self.config.record_stats:
            return
        keys = result.plan.num_keys.float()
        density = (result.plan.pairs + dense_queries * keys) / ((tokens + dense_queries) * keys)
        call = SVG2CallStats(key[1], max(self.step, 0), self.branch, False, tokens + dense_queries,
                             math.nan, math.nan, math.nan, math.nan)  # until read
        self.stats.add(call, density.mean(), watch)


# -- processors ----------------------------------------------------------------------------------------------------


class _SVG2Processor:
    """Holds the original processor; attributes diffusers sets on processors (attention backend, parallel config)
    go to the original one, which runs every dense call."""

    def __init__(self, original, runtime: SVG2Runtime, key: tuple):
        self.__dict__["original"] = original
        self.__dict__["runtime"] = runtime
        self.__dict__["key"] = key

    def __getattr__(self, name):
        original = self.__dict__.get("original")
        if original is None:  # half-built (copy / unpickle)
            raise AttributeError(name)
        return getattr(original, name)

    def __setattr__(self, name, value):
        setattr(self.original, name, value)

    @property
    def layer(self) -> int:
        return self.key[1]


class SVG2WanProcessor(_SVG2Processor):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        eligible = encoder_hidden_states is None and attention_mask is None and not kwargs
        mode = self.runtime.begin_attention(self.layer, hidden_states.shape[1], eligible)
        if mode == "dense":
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        query, key, value = wan_qkv(attn, hidden_states, rotary_emb)
        if mode == "cluster":
            self.runtime.warm_clusters(self.key, to_heads(query), to_heads(key))
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        out = self.runtime.attend(self.key, to_heads(query), to_heads(key), to_heads(value))
        out = from_heads(out, hidden_states.shape[0]).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class SVG2HunyuanProcessor(_SVG2Processor):
    """Video queries: SVG2 over the video key clusters plus every valid text key (one always-kept extra range).
    Text queries: dense attention over all valid keys (256 rows: negligible), as the original processor does."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        n_video = hidden_states.shape[1]
        mode = self.runtime.begin_attention(self.layer, n_video, encoder_hidden_states is not None, attention_mask)
        if mode == "dense":
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = hunyuan_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        if mode == "cluster":
            self.runtime.warm_clusters(self.key, to_heads(query[:, :n_video]), to_heads(key[:, :n_video]))
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        batch, n, heads = query.shape[:3]
        n_text = n - n_video
        if attention_mask is None:
            text_valid = torch.ones(batch, n_text, dtype=torch.bool, device=query.device)
        else:
            text_valid = attention_mask.reshape(batch, -1)[:, n_video:].bool()
        # Valid text keys first, so they form one contiguous extra range after the video keys.
        text_order = torch.sort((~text_valid).to(torch.uint8), dim=1, stable=True).indices + n_video
        key_order = torch.cat([torch.arange(n_video, device=query.device).expand(batch, -1), text_order], 1)
        key_order = key_order.view(batch, n, 1, 1).expand(-1, -1, heads, key.shape[-1])
        extra = text_valid.sum(1).repeat_interleave(heads)
        video_out = self.runtime.attend(
            self.key, to_heads(query[:, :n_video]), to_heads(key.gather(1, key_order)),
            to_heads(value.gather(1, key_order)), extra_keys=extra, dense_queries=n_text,
        )
        mask = None if attention_mask is None else attention_mask.reshape(batch, 1, 1, n).bool()
        text_out = F.scaled_dot_product_attention(
            query[:, n_video:].transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask,
        ).transpose(1, 2).flatten(2, 3)
        hidden = from_heads(video_out, batch).to(query.dtype)
        text_hidden = text_out.to(query.dtype)
        if getattr(attn, "to_out", None) is not None:
            hidden = attn.to_out[1](attn.to_out[0](hidden))
        if getattr(attn, "to_add_out", None) is not None:
            text_hidden = attn.to_add_out(text_hidden)
        return hidden, text_hidden


# -- install -------------------------------------------------------------------------------------------------------


def _install(model, config: SVG2Config, handle, host: str, class_name: str, layers, processor_cls) -> None:
    config = config.for_model(host)  # the official scripts' cluster counts for this model, unless set
    handle.config = config
    runtime = SVG2Runtime(config)
    handle.stats = runtime.stats
    handle.on_reset(runtime.new_generation)
    for index, transformer in enumerate(transformers_of(model, class_name)):
        for layer, attn in layers(transformer):
            handle.claim(attn, "attention_processor")
            handle.set_attr(attn, "processor", processor_cls(attn.processor, runtime, (index, layer)))
        handle.forward_pre_hook(transformer, runtime.pre_hook, with_kwargs=True)
        if callable(getattr(transformer, "cache_context", None)):
            handle.set_attr(transformer, "cache_context", runtime.wrap_cache_context(transformer.cache_context))
    check_inputs = getattr(model, "check_inputs", None)
    if not is_class(model, class_name) and callable(check_inputs):

        def check_inputs_then_reset(*args, **kwargs):
            runtime.new_generation()
            return check_inputs(*args, **kwargs)

        handle.set_attr(model, "check_inputs", check_inputs_then_reset)


def install_wan(model, config, handle) -> None:
    _install(model, config, handle, "wan", WAN, wan_layers, SVG2WanProcessor)


def install_hunyuan(model, config, handle) -> None:
    _install(model, config, handle, "hunyuan_video", HUNYUAN, hunyuan_layers, SVG2HunyuanProcessor)


add_bridge("wan", "svg2", install_wan)
add_bridge("hunyuan_video", "svg2", install_hunyuan)

"""``vtoken bench-dit``: SVG2 vs dense SDPA on video-DiT self-attention, side by side in one run.

Speed: dense ``scaled_dot_product_attention`` against SVG2's stages, each timed on its own: k-means (the one-off
seeded initialisation, and the per-step warm start from the previous step's centroids), the plan (mass estimate,
top-p selection, key ranges) and the sparse attention (permutation + variable-block kernel + inverse permutation;
the kernel alone is reported too). The speed-up of the sparse attention is compared with the ideal ``1 / density``.

Quality: on structured Q/K (Gaussian clusters that follow moving objects, so they are coherent in space and time,
plus a smooth positional part), the attention-mass recall of the kept blocks and the relative output error against
dense attention, as a function of ``top_p``.

Shapes: ``gpu`` is Wan 2.1 1.3B self-attention at 480p / 81 frames (12 heads, head dim 128, 21 x 30 x 52 = 32,760
tokens, bf16); ``cpu`` a scaled-down one (fp32); ``tiny`` is for tests. Results go to ``<out>/bench_dit.json`` and
``<out>/bench_dit.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vtoken.evals.common.arguments import add_threads_argument, comma_list, config_field, device, positive_int
from vtoken.evals.common.machine import Threads, cpu_model, load_line, set_threads
from vtoken.evals.common.timing import median_ms
from vtoken.kernels.svg2.flashinfer_backend import available as flashinfer_available
from vtoken.kernels.svg2.flashinfer_backend import flashinfer_attention
from vtoken.methods.svg2 import (
    MODEL_CLUSTERS,
    SVG2_BACKENDS,
    SVG2Config,
    allowed_pairs,
    flashinfer_layout,
    make_plan,
    permute_tokens,
    sparse_attention,
    step_clusters,
)


@dataclass(frozen=True)
class Shape:
    heads: int
    head_dim: int
    frames: int
    height: int  # latent tokens per frame = height x width
    width: int
    dtype: str
    q_clusters: int
    k_clusters: int

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width


SHAPES = {
    "gpu": Shape(12, 128, 21, 30, 52, "bfloat16", *MODEL_CLUSTERS["wan"]),  # Wan 2.1 1.3B, 480x832, 81 frames
    "cpu": Shape(4, 64, 8, 16, 24, "float32", 24, 96),  # 3,072 tokens
    "tiny": Shape(2, 32, 3, 8, 12, "float32", 6, 24),  # 288 tokens, for tests
}


def machine(threads: Threads | None = None) -> dict:
    """What the numbers were measured on (with ``threads``: the load and the thread choice of this run)."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if threads is not None:
        info.update(threads.as_dict())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


# -- structured inputs -----------------------------------------------------------------------------------------------


def structured_qkv(shape: Shape, device, objects: int = 32, object_logit: float = 5.0, position_logit: float = 2.0,
                   noise: float = 0.5, seed: int = 0, drift: float = 0.0):
    """Q, K, V (H, N, D) for a video of moving objects.

    Each token belongs to the object nearest to it in its frame (objects move on straight lines), so a semantic
    cluster is a blob that is coherent in space and time. Per head, a query and a key of the same object share a
    Gaussian embedding worth ``object_logit`` in ``q.k / sqrt(D)`` (about 0 between objects), plus a smooth
    random-Fourier positional part worth up to ``position_logit`` between nearby tokens, plus token noise (entries of
    std ``noise``). V is the object's value embedding plus noise, so outputs keep a meaningful norm. ``drift`` > 0
    perturbs Q, K, V (the next denoising step of the same video: same objects, slightly different features).
    """
    gen = torch.Generator().manual_seed(seed)
    f, hh, ww, d, heads = shape.frames, shape.height, shape.width, shape.head_dim, shape.heads
    start = torch.rand(objects, 2, generator=gen) * torch.tensor([hh, ww])
    velocity = (torch.rand(objects, 2, generator=gen) - 0.5) * 2.0
    t, y, x = torch.meshgrid(torch.arange(f), torch.arange(hh), torch.arange(ww), indexing="ij")
    coords = torch.stack([t, y, x], -1).reshape(-1, 3).float()
    n = coords.shape[0]
    centres = start[None] + velocity[None] * torch.arange(f).view(f, 1, 1)  # (F, objects, 2)
    owner = torch.cdist(coords[:, None, 1:], centres[coords[:, 0].long()]).squeeze(1).argmin(-1)  # (N,)
    freqs = torch.randn(heads, 3, 16, generator=gen) * torch.tensor([0.15, 0.25, 0.25]).view(1, 3, 1)
    phase = coords @ freqs  # (H, N, 16)
    position = torch.cat([phase.sin(), phase.cos()], -1) @ torch.randn(heads, 32, d, generator=gen) / 4  # var 1
    emb = torch.randn(heads, objects, d, generator=gen)[:, owner]  # shared by the queries and keys of an object

    def qk():
        return (object_logit**0.5 * emb + position_logit**0.5 * position) / d**0.25 + noise * torch.randn(
            heads, n, d, generator=gen)

    q, k = qk(), qk()
    v = torch.randn(heads, objects, d, generator=gen)[:, owner] + noise * torch.randn(heads, n, d, generator=gen)
    if drift:
        q, k, v = (z + drift * torch.randn(z.shape, generator=gen) for z in (q, k, v))
    dtype = getattr(torch, shape.dtype)
    return tuple(z.to(device=device, dtype=dtype).contiguous() for z in (q, k, v))


# -- measurements -------------------------------------------------------------------------------------------------




def attention_recall(q, k, plan, q_labels, k_labels, scale: float, rows: int = 256, seed: int = 0) -> float:
    """Mean over sampled query rows of the exact attention probability that falls on the keys SVG2 keeps."""
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(q.shape[1], generator=gen)[: min(rows, q.shape[1])].to(q.device)
    probs = torch.softmax((q[:, pick].float() @ k.float().transpose(1, 2)) * scale, dim=-1)
    kept = allowed_pairs(plan, q_labels[:, pick], k_labels)
    return float((probs * kept).sum(-1).mean())


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def run_benchmark(shape: Shape, device: torch.device, top_ps, reps: int, backend: str, min_ratio: float,
                  progress: bool = True, threads: Threads | None = None) -> dict:
    """``backend`` runs k-means and the sparse attention; on CUDA, where flashinfer imports, FlashInfer's sparse
    attention is timed beside it on the same plans (its ``plan`` included, as each call would pay it)."""
    from tqdm import tqdm

    compare_flashinfer = device.type == "cuda" and backend != "flashinfer" and flashinfer_available()
    q, k, v = structured_qkv(shape, device)
    q_next, k_next, v_next = structured_qkv(shape, device, drift=0.1)  # the following denoising step
    scale = 1.0 / math.sqrt(shape.head_dim)
    cfg = SVG2Config(q_clusters=shape.q_clusters, k_clusters=shape.k_clusters, min_key_cluster_ratio=min_ratio,
                     backend=backend)
    gen = torch.Generator(device=device)

    dense_ms, dense_out = median_ms(lambda: F.scaled_dot_product_attention(q[None], k[None], v[None])[0], reps, device)
    ref_next = F.scaled_dot_product_attention(q_next[None], k_next[None], v_next[None])[0]

    def seeded(x, c):
        return step_clusters(x, c, cfg, generator=gen.manual_seed(0))

    init_ms, (qc0, kc0) = median_ms(lambda: (seeded(q, cfg.q_clusters), seeded(k, cfg.k_clusters)), 1, device)
    warm_ms, (qc, kc) = median_ms(lambda: (
        step_clusters(q_next, cfg.q_clusters, cfg, qc0.centroids),
        step_clusters(k_next, cfg.k_clusters, cfg, kc0.centroids),
    ), reps, device)

    results = []
    for top_p in tqdm(top_ps, desc="top_p", disable=not progress):
        plan_ms, plan = median_ms(lambda p=top_p: make_plan(qc, kc, scale, p, cfg.min_key_clusters), reps, device)
        attn_ms, out = median_ms(lambda p=plan: sparse_attention(q_next, k_next, v_next, p, scale, backend), reps,
                                 device)
        kernel_ms = _kernel_ms(q_next, k_next, v_next, plan, scale, backend, reps, device)
        density = float(plan.density.mean())
        beside = {}
        if compare_flashinfer:  # the release's backend, side by side on the same plan
            fi_ms, fi_out = median_ms(lambda p=plan: sparse_attention(q_next, k_next, v_next, p, scale, "flashinfer"),
                                      reps, device)
            beside["flashinfer"] = {"attention_ms": fi_ms, "attention_speedup": dense_ms / fi_ms,
                                    "relative_error": relative_error(fi_out, ref_next)}
        results.append({
            "top_p": top_p,
            "density": density,
            "recall": attention_recall(q_next, k_next, plan, qc.labels, kc.labels, scale),
            "relative_error": relative_error(out, ref_next),
            "plan_ms": plan_ms,
            "attention_ms": attn_ms,
            "kernel_ms": kernel_ms,
            "ideal_speedup": 1.0 / density,
            "attention_speedup": dense_ms / attn_ms,
            "kernel_speedup": dense_ms / kernel_ms,
            "attention_efficiency": dense_ms / attn_ms * density,
            "svg2_step_ms": warm_ms + plan_ms + attn_ms,
            **beside,
        })
    del dense_out
    return {
        "machine": machine(threads),
        "device": str(device),
        "shape": {**asdict(shape), "tokens": shape.tokens},
        "config": {**asdict(cfg), "backend": backend},
        "flashinfer": "timed beside" if compare_flashinfer else ("the backend" if backend == "flashinfer" else
                                                                 "not timed (needs CUDA and flashinfer-python)"),
        "dense_ms": dense_ms,
        "kmeans_init_ms": init_ms,
        "kmeans_warm_ms": warm_ms,
        "kmeans_warm_over_dense": warm_ms / dense_ms,
        "results": results,
    }


def _kernel_ms(q, k, v, plan, scale, backend, reps, device) -> float:
    """The variable-block kernel alone (FlashInfer: its plan and run), on inputs already in the permuted layout."""
    from vtoken.kernels.svg2 import varblock_attention

    qp, kp, vp = permute_tokens(q, plan.q_order), permute_tokens(k, plan.k_order), permute_tokens(v, plan.k_order)
    if backend == "flashinfer":
        layout = flashinfer_layout(plan)
        return median_ms(lambda: flashinfer_attention(qp, kp, vp, *layout, scale), reps, device)[0]
    args = (qp, kp, vp, plan.q_offsets, plan.range_start, plan.range_end, plan.num_ranges, scale, backend)
    return median_ms(lambda: varblock_attention(*args), reps, device)[0]


# -- report -------------------------------------------------------------------------------------------------------


def format_report(report: dict) -> str:
    m, s = report["machine"], report["shape"]
    lines = [
        f"machine: {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads), gpu: {m['gpu'] or 'none'}"
        f", torch {m['torch']}, triton {m['triton']}",
        *([load_line(m)] if "load_1min" in m else []),
        f"shape: heads {s['heads']}, head dim {s['head_dim']}, {s['frames']}x{s['height']}x{s['width']} = "
        f"{s['tokens']} tokens, {s['dtype']} on {report['device']}; "
        f"clusters q {s['q_clusters']} / k {s['k_clusters']}, "
        f"min key-cluster ratio {report['config']['min_key_cluster_ratio']}, backend {report['config']['backend']}",
        f"dense SDPA {report['dense_ms']:.2f} ms | k-means init ({report['config']['kmeans_init_iters']} it) "
        f"{report['kmeans_init_ms']:.2f} ms | k-means warm ({report['config']['kmeans_step_iters']} it) "
        f"{report['kmeans_warm_ms']:.2f} ms = {100 * report['kmeans_warm_over_dense']:.1f} % of dense",
        "top_p  density  recall  rel.err  plan ms  attn ms  kernel ms  ideal x  attn x  kernel x  attn/ideal",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['top_p']:<5.2f}  {r['density']:7.3f}  {r['recall']:6.3f}  {r['relative_error']:7.4f}  "
            f"{r['plan_ms']:7.2f}  {r['attention_ms']:7.2f}  {r['kernel_ms']:9.2f}  {r['ideal_speedup']:7.2f}  "
            f"{r['attention_speedup']:6.2f}  {r['kernel_speedup']:8.2f}  {r['attention_efficiency']:10.2f}"
        )
    lines.append(f"flashinfer: {report['flashinfer']}")
    for r in report["results"]:
        if "flashinfer" in r:
            fi = r["flashinfer"]
            lines.append(f"  top_p {r['top_p']:.2f}: flashinfer attn {fi['attention_ms']:.2f} ms = "
                         f"{fi['attention_speedup']:.2f}x dense ({fi['attention_speedup'] / r['ideal_speedup']:.2f} "
                         f"of ideal; ours {r['attention_efficiency']:.2f}), rel.err {fi['relative_error']:.4f}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = report["results"]
    top_p = [r["top_p"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(top_p, [r["recall"] for r in rows], "o-", label="attention-mass recall")
    ax1.plot(top_p, [r["density"] for r in rows], "s-", label="density")
    ax1.plot(top_p, [r["relative_error"] for r in rows], "^-", label="relative output error")
    ax1.set_xlabel("top_p")
    ax1.set_title("quality vs dense (structured Q/K)")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.plot(top_p, [r["ideal_speedup"] for r in rows], "k--", label="ideal 1/density")
    ax2.plot(top_p, [r["attention_speedup"] for r in rows], "o-", label="sparse attention")
    ax2.plot(top_p, [r["kernel_speedup"] for r in rows], "s-", label="kernel only")
    ax2.plot(top_p, [report["dense_ms"] / r["svg2_step_ms"] for r in rows], "^-", label="k-means warm + plan + attn")
    if all("flashinfer" in r for r in rows):
        ax2.plot(top_p, [r["flashinfer"]["attention_speedup"] for r in rows], "d-", label="FlashInfer attention")
    ax2.set_yscale("log")
    ax2.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax2.set_xlabel("top_p")
    ax2.set_title("speed-up over dense SDPA")
    ax2.grid(alpha=0.3)
    ax2.legend()
    s, m = report["shape"], report["machine"]
    fig.suptitle(f"SVG2, {s['heads']} heads x {s['tokens']} tokens x d{s['head_dim']} {s['dtype']} on "
                 f"{m['gpu'] or m['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- CLI ----------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=["auto", *SHAPES], default="auto",
                        help="auto: 'gpu' (Wan 2.1 1.3B, 32,760 tokens) when CUDA is available, else 'cpu'")
    parser.add_argument("--device", type=device, default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--top-p", type=comma_list(config_field(SVG2Config, "top_p", float)),
                        default="0.5,0.7,0.8,0.9,0.95,0.99,1.0",
                        help="comma-separated top_p values, each in (0, 1] as svg2 takes them")
    parser.add_argument("--reps", type=positive_int, default=5,
                        help="timed repetitions per measurement (median reported)")
    parser.add_argument("--backend", choices=list(SVG2_BACKENDS), default="auto",
                        help="k-means and attention kernels (flashinfer: FlashInfer's attention, k-means as auto); "
                             "on CUDA with flashinfer-python installed, FlashInfer's attention is timed beside any "
                             "other")
    parser.add_argument("--min-key-cluster-ratio", type=config_field(SVG2Config, "min_key_cluster_ratio", float),
                        default=SVG2Config.min_key_cluster_ratio,
                        help="least share of key clusters each query cluster keeps")
    add_threads_argument(parser)
    parser.add_argument("--out", default="bench_dit_out", help="folder for bench_dit.json and bench_dit.png")


def run(args: argparse.Namespace) -> int:
    threads = set_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = args.shape if args.shape != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    if device.type != "cuda":
        print("no GPU: CPU figures only (the GPU shape and the speed targets need a CUDA device)")
    report = run_benchmark(SHAPES[name], device, args.top_p, args.reps, args.backend, args.min_key_cluster_ratio,
                           threads=threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_dit.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "bench_dit.png")
    print(format_report(report))
    if threads.warning:
        print(threads.warning, file=sys.stderr)
    print(f"wrote {out / 'bench_dit.json'} and {out / 'bench_dit.png'}")
    return 0

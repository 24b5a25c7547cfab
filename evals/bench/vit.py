"""``vtoken bench-vit``: images/s of a ViT dense vs with token clustering, side by side in one run, plus fidelity.

Speed does not depend on the weights, so full-size timm architectures with random weights are valid for it.
Fidelity (mean cosine similarity between patched and dense final patch features) *does* depend on them: on random
weights it only says the plumbing is right. ``--hf PATH`` reruns everything on a trained Hugging Face CLIP vision
model or LLaVA checkpoint (its vision tower, at the hidden state LLaVA consumes), ``--images DIR`` on real images.
Writes ``bench_vit.json`` and ``bench_vit.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import vtoken
from vtoken.cli import UsageError, usage_errors
from vtoken.evals.common.arguments import (
    DTYPES,
    add_threads_argument,
    checkpoint_dir,
    config_field,
    device,
    dtype_name,
    non_negative_int,
    positive_int,
)
from vtoken.evals.common.machine import describe_machine, machine_line, set_threads
from vtoken.evals.common.timing import elapsed_ms
from vtoken.methods.clustering import Grid, TokenClusteringConfig, cluster_grid

DEFAULT_MODELS = ("vit_base_patch16_224", "vit_large_patch14_clip_336")


@dataclass
class Subject:
    """One ViT to measure: what to patch, how to get its final patch features, and its shape."""

    name: str
    model: torch.nn.Module  # what vtoken.patch receives
    features: Callable[[torch.Tensor], torch.Tensor]  # images -> (B, N, C) final patch features
    depth: int
    width: int
    prefix: int
    image_size: tuple[int, int]
    patch: tuple[int, int]
    extra: dict  # extra patch arguments (e.g. reconstruct_after for a LLaVA tower)


@dataclass
class Result:
    model: str
    batch: int
    grid: str
    clusters: str
    cluster_after: int
    reconstruct_after: int
    depth: int
    dense_ms: float
    patched_ms: float
    dense_img_s: float
    patched_img_s: float
    speedup: float  # ratio of the medians
    speedup_best: float  # ratio of the fastest runs: load on a shared machine only ever adds time
    mac_ratio: float  # analytic backbone MACs patched / dense
    overhead_ms: float  # clustering + affinity + reconstruction alone, per batch
    cos_mean: float
    cos_p5: float
    weights: str
    dense_runs_ms: list[float]  # every timed repetition, to judge the noise behind the medians
    patched_runs_ms: list[float]


def number(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def cluster_after(text: str) -> int | float:
    """Blocks at full resolution: an int >= 1, or a float in (0, 1) = that fraction of the depth."""
    value = number(text)
    if (isinstance(value, float) and not 0 < value < 1) or (isinstance(value, int) and value < 1):
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or a fraction of the depth in (0, 1), got {text}")
    return value


def folder(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=None,
                        help=f"timm ViT names (random weights); default: {' '.join(DEFAULT_MODELS)}")
    parser.add_argument("--hf", type=checkpoint_dir, default=None,
                        help="path to a Hugging Face CLIP vision / LLaVA checkpoint to measure instead of the timm "
                             "models (trained weights: fidelity becomes meaningful)")
    parser.add_argument("--images", type=folder, default=None,
                        help="folder of images for fidelity (default: smooth synthetic)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="images per forward")
    parser.add_argument("--reps", type=positive_int, default=3, help="timed repetitions of each side (median reported)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed repetitions first")
    parser.add_argument("--cluster-after", type=cluster_after, default="0.25",
                        help="blocks at full resolution: an int, or a float = fraction of the depth")
    parser.add_argument("--num-clusters", type=config_field(TokenClusteringConfig, "num_clusters", number),
                        default="0.25",
                        help="clusters: a perfect-square int, or a float = fraction of patches (0.25: 24x24 -> 12x12)")
    parser.add_argument("--iterations", type=config_field(TokenClusteringConfig, "iterations", int), default=5,
                        help="local k-means iterations")
    parser.add_argument("--device", type=device, default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", type=dtype_name, default="float32", help="weights and activations")
    add_threads_argument(parser)
    parser.add_argument("--out", default="bench_vit", help="output folder for JSON + PNG")


def patch_plan(args, depth: int, grid: Grid, extra: dict) -> tuple[dict, TokenClusteringConfig, int, Grid]:
    """The token_clustering arguments for a ViT of this depth and patch grid: (patch arguments, config, the block
    it reconstructs after, the cluster grid). A ValueError when the arguments do not fit this model."""
    after = args.cluster_after
    alpha = max(1, round(depth * after)) if isinstance(after, float) else after
    patch_args = dict(cluster_after=alpha, num_clusters=args.num_clusters, iterations=args.iterations, **extra)
    cfg = TokenClusteringConfig(**patch_args)
    _, beta = cfg.placement(depth)
    return patch_args, cfg, beta, cluster_grid(cfg.num_clusters, grid)


def check_timm_models(args) -> None:
    """Every ``--models`` name is a timm ViT that token clustering can patch with these arguments (built on the
    meta device: no memory, no time), before any model is measured."""
    import timm

    methods, hosts = vtoken.methods(), vtoken.hosts()
    vit_hosts = [hosts[name] for name in methods["token_clustering"].hosts if name in hosts]
    for name in args.models:
        if not timm.is_model(name):
            raise ValueError(f"--models {name}: timm has no model of that name; timm.list_models('vit_*') lists "
                             f"its ViTs, e.g. {', '.join(DEFAULT_MODELS)}")
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
        except RuntimeError:  # timm < 1.0.9 reads tensor values while building: build it for real
            model = timm.create_model(name, pretrained=False)
        if not any(host.matches(model) for host in vit_hosts):
            raise ValueError(f"--models {name}: a timm {type(model).__name__} is not a ViT that token_clustering can "
                             f"patch; it patches: {'; '.join(host.description for host in vit_hosts)}")
        grid = tuple(s // p for s, p in zip(model.patch_embed.img_size, model.patch_embed.patch_size))
        try:
            patch_plan(args, len(model.blocks), grid, {})
        except ValueError as error:
            raise ValueError(f"--models {name}: {error}") from None


# -- subjects ----------------------------------------------------------------------------------------------------
def timm_subject(name: str, device, dtype) -> Subject:
    import timm

    model = timm.create_model(name, pretrained=False).eval().to(device, dtype)
    prefix = model.num_prefix_tokens
    return Subject(
        name, model, lambda x: model.forward_features(x)[:, prefix:], len(model.blocks), model.embed_dim, prefix,
        tuple(model.patch_embed.img_size), tuple(model.patch_embed.patch_size), {},
    )


HF_MODEL_TYPES = ("llava", "clip", "clip_vision_model")


def check_hf(args) -> None:
    """``--hf`` is a checkpoint whose CLIP vision tower bench-vit can read, and the clustering arguments fit it."""
    from transformers import AutoConfig

    path = args.hf
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in HF_MODEL_TYPES:
        raise ValueError(f"--hf {path}: a {config.model_type!r} checkpoint; bench-vit measures the CLIP vision tower "
                         f"of a {', '.join(HF_MODEL_TYPES)} checkpoint")
    extra = {}
    if config.model_type == "llava":
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError(f"--hf {path}: vision_feature_layer={config.vision_feature_layer!r}; only a single int "
                             "layer is supported")
        extra = {"reconstruct_after": config.vision_feature_layer}
    vision = getattr(config, "vision_config", config)
    side = vision.image_size // vision.patch_size
    try:
        patch_plan(args, vision.num_hidden_layers, (side, side), extra)
    except ValueError as error:
        raise ValueError(f"--hf {path}: {error}") from None


def hf_subject(path: str, device, dtype) -> Subject:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if config.model_type == "llava":
        from transformers import LlavaForConditionalGeneration

        llava = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
        tower = llava.model.vision_tower
        layer = config.vision_feature_layer
        extra = {"reconstruct_after": layer}
    else:
        from transformers import CLIPVisionModel

        tower = CLIPVisionModel.from_pretrained(path, dtype=dtype)
        layer, extra = -1, {}
    tower = tower.eval().to(device)
    vision = tower.config

    def features(x):
        return tower(pixel_values=x, output_hidden_states=True).hidden_states[layer][:, 1:]

    side, patch = vision.image_size, vision.patch_size
    depth = vision.num_hidden_layers
    return Subject(f"{Path(path).name} (hf {config.model_type}, hidden_states[{layer}])", tower, features, depth,
                   vision.hidden_size, 1, (side, side), (patch, patch), extra)


def load_images(folder: str | None, n: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(n, 3, H, W) normalised with CLIP's mean/std. Synthetic default: smooth random colour fields + mild noise,
    closer to natural image statistics than white noise (which no clustering can preserve)."""
    mean = torch.tensor([0.4815, 0.4578, 0.4082]).view(1, 3, 1, 1)
    std = torch.tensor([0.2686, 0.2613, 0.2758]).view(1, 3, 1, 1)
    if folder is None:
        coarse = torch.rand(n, 3, 6, 6, generator=generator)
        images = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
        images = (images + 0.05 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    else:
        from PIL import Image

        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
        if not files:
            raise ValueError(f"--images {folder}: no .png/.jpg files")
        files = (files * n)[:n]
        pixels = [torch.tensor(list(Image.open(p).convert("RGB").resize(size[::-1]).getdata()), dtype=torch.float32)
                  for p in files]
        images = torch.stack([p.view(size[0], size[1], 3).permute(2, 0, 1) / 255.0 for p in pixels])
    return (images - mean) / std


# -- measuring ---------------------------------------------------------------------------------------------------
def block_macs(tokens: int, width: int) -> float:
    """MACs of one ViT block with MLP ratio 4: QKV/out/MLP projections + attention scores and values."""
    return 12 * tokens * width**2 + 2 * tokens**2 * width


def clustering_overhead(cfg, batch: int, grid, width: int, device, dtype, reps: int) -> float:
    """Seconds per batch of the two layers alone (clustering, affinity, reconstruction) on tokens of this shape."""
    tokens = torch.randn(batch, grid[0] * grid[1], width, device=device, dtype=dtype)
    clustering, reconstruction = cfg.clustering(), cfg.reconstruction()

    def run():
        result = clustering(tokens, grid)
        reconstruction(result.centers, reconstruction.affinity(tokens, result))

    run()
    return statistics.median(elapsed_ms(run, device)[0] / 1e3 for _ in range(reps))


def measure(subject: Subject, args, device, dtype, progress) -> Result:
    grid = (subject.image_size[0] // subject.patch[0], subject.image_size[1] // subject.patch[1])
    patch_args, cfg, beta, clusters = patch_plan(args, subject.depth, grid, subject.extra)  # checked in run()
    alpha = patch_args["cluster_after"]

    generator = torch.Generator().manual_seed(0)
    images = load_images(args.images, args.batch_size, subject.image_size, generator).to(device, dtype)
    dense_t, patched_t = [], []
    with torch.inference_mode():
        dense = subject.features(images).float()
        with vtoken.patch(subject.model, "token_clustering", **patch_args):
            patched = subject.features(images).float()
        for rep in range(args.warmup + args.reps):  # interleaved, so load drifts hit both sides alike
            t_dense = elapsed_ms(lambda: subject.features(images), device)[0] / 1e3
            with vtoken.patch(subject.model, "token_clustering", **patch_args):
                t_patched = elapsed_ms(lambda: subject.features(images), device)[0] / 1e3
            if rep >= args.warmup:
                dense_t.append(t_dense)
                patched_t.append(t_patched)
            progress.update(1)
        overhead = clustering_overhead(cfg, args.batch_size, grid, subject.width, device, dtype, args.reps)

    cos = F.cosine_similarity(patched, dense, dim=-1).flatten()
    n, m = grid[0] * grid[1] + subject.prefix, clusters[0] * clusters[1] + subject.prefix
    dense_macs = subject.depth * block_macs(n, subject.width)
    patched_macs = (alpha + subject.depth - beta) * block_macs(n, subject.width) + (beta - alpha) * block_macs(
        m, subject.width)
    dense_s, patched_s = statistics.median(dense_t), statistics.median(patched_t)
    return Result(
        model=subject.name, batch=args.batch_size, grid=f"{grid[0]}x{grid[1]}", clusters=f"{clusters[0]}x{clusters[1]}",
        cluster_after=alpha, reconstruct_after=beta, depth=subject.depth,
        dense_ms=1e3 * dense_s, patched_ms=1e3 * patched_s,
        dense_img_s=args.batch_size / dense_s, patched_img_s=args.batch_size / patched_s,
        speedup=dense_s / patched_s, speedup_best=min(dense_t) / min(patched_t),
        mac_ratio=patched_macs / dense_macs, overhead_ms=1e3 * overhead,
        cos_mean=cos.mean().item(), cos_p5=cos.quantile(0.05).item(),
        weights="checkpoint" if args.hf else "random",
        dense_runs_ms=[round(1e3 * t, 2) for t in dense_t], patched_runs_ms=[round(1e3 * t, 2) for t in patched_t],
    )


def table(results: list[Result]) -> str:
    head = (f"{'model':44s} {'grid':>6s} {'clusters':>8s} {'a/b/L':>9s} {'dense img/s':>11s} {'patched img/s':>13s} "
            f"{'speedup med/best':>16s} {'MACs':>6s} {'overhead ms':>11s} {'cos mean':>8s} {'cos p5':>7s} weights")
    rows = [
        f"{r.model:44s} {r.grid:>6s} {r.clusters:>8s} {f'{r.cluster_after}/{r.reconstruct_after}/{r.depth}':>9s} "
        f"{r.dense_img_s:11.3f} {r.patched_img_s:13.3f} {f'{r.speedup:.2f}x / {r.speedup_best:.2f}x':>16s} "
        f"{r.mac_ratio:6.1%} {r.overhead_ms:11.1f} "
        f"{r.cos_mean:8.4f} {r.cos_p5:7.4f} {r.weights}"
        for r in results
    ]
    return "\n".join([head, *rows])


def plot(results: list[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, fidelity) = plt.subplots(1, 2, figsize=(11, 4.5))
    xs = list(range(len(results)))
    names = [r.model.split(" ")[0] for r in results]
    speed.bar(xs, [r.speedup for r in results], 0.5, label="measured (median patched / dense images/s)")
    speed.scatter(xs, [r.speedup_best for r in results], color="tab:orange", zorder=3, label="fastest runs")
    speed.scatter(xs, [1 / r.mac_ratio for r in results], color="black", marker="_", s=900, zorder=3,
                  label="ideal from backbone MACs")
    speed.axhline(1.0, color="gray", linewidth=0.8)
    for x, r in zip(xs, results, strict=True):
        speed.annotate(f"{r.speedup:.2f}x\n{r.dense_img_s:.3g} -> {r.patched_img_s:.3g} img/s", (x, r.speedup / 2),
                       ha="center", va="center", fontsize=8, color="white")
    speed.set_xticks(xs, names, fontsize=8)
    speed.set_ylabel("speed-up over dense")
    speed.set_title("throughput, same run", fontsize=9)
    speed.legend(fontsize=7, loc="upper left")
    fidelity.bar(xs, [r.cos_mean for r in results], 0.5)
    for x, r in zip(xs, results, strict=True):
        fidelity.annotate(f"{r.cos_mean:.3f}", (x, r.cos_mean), ha="center", va="bottom", fontsize=8)
    fidelity.set_xticks(xs, names, fontsize=8)
    fidelity.set_ylim(0, 1.05)
    fidelity.set_title(f"mean cos(patched, dense) of final patch features, {results[0].weights} weights", fontsize=9)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    threads = set_threads(args.threads)
    if args.hf and args.models:
        raise UsageError("--hf and --models both name what to measure; give one")
    args.models = args.models or list(DEFAULT_MODELS)
    with usage_errors():
        if args.hf:
            check_hf(args)
        else:
            check_timm_models(args)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    info = describe_machine(device, threads) | {"dtype": args.dtype}
    where = f"{machine_line(info)}, {args.dtype}"
    print(where)
    print(threads.line())
    names = [args.hf] if args.hf else args.models
    progress = tqdm(total=len(names) * (args.warmup + args.reps), desc="bench-vit", unit="rep")
    results = []
    for name in names:
        subject = hf_subject(name, device, dtype) if args.hf else timm_subject(name, device, dtype)
        results.append(measure(subject, args, device, dtype, progress))
        del subject
    progress.close()
    print(table(results))
    if not args.hf:
        print("fidelity is on RANDOM weights: it checks the plumbing, not the quality on a trained model (use --hf)")
    if threads.warning:
        print(threads.warning, file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    report = {"machine": info, "settings": settings, "results": [asdict(r) for r in results]}
    (out / "bench_vit.json").write_text(json.dumps(report, indent=2))
    plot(results, out / "bench_vit.png", f"{where}\n{threads.line()}")
    print(f"wrote {out / 'bench_vit.json'} and {out / 'bench_vit.png'}")
    return 0

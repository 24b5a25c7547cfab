"""Token clustering (Expedit) in ViT backbones: the vision-blocks stage of the timm, HF CLIP and open_clip hosts.

Token clustering goes in with at most three hooks per instance, so the module tree, the ``state_dict`` and the
host's own ``forward`` stay as they are:

* a forward hook on the patch-embedding conv records the patch grid (H, W) of the current input;
* a forward pre-hook on block ``alpha`` (0-based: the first block after ``cluster_after`` full-resolution blocks)
  replaces its input patch tokens by the cluster centres; prefix tokens ([CLS], registers) pass through;
* with reconstruction, a forward hook on block ``beta - 1`` maps its output back to the full patch grid. It is
  *prepended*, so the output-recording hooks transformers puts on ``CLIPEncoderLayer`` (``hidden_states``, which
  LLaVA reads) always see the reconstructed tensor.

Blocks run on whatever sequence length they get: ViT attention has no per-length state (vision attention masks
are None), and absolute position embeddings were added before block 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vtoken.adapters.vit import SITES, VitSite
from vtoken.methods.clustering import Grid, TokenClusteringConfig
from vtoken.registry import add_bridge


@dataclass
class ClusteringStats:
    """The last forward pass: the grids and sequence lengths before and after clustering (per image)."""

    patch_grid: Grid
    cluster_grid: Grid
    cluster_after: int
    reconstruct_after: int | None
    tokens_before: int  # prefix + H*W
    tokens_after: int  # prefix + h*w, what blocks cluster_after+1 ... reconstruct_after see
    inverse_temperatures: torch.Tensor  # (B,) on the model's device, read only when ``temperature`` is looked at

    @property
    def temperature(self) -> list[float]:
        """The clustering inverse temperature of each image (read from the device here, not in the forward pass)."""
        return self.inverse_temperatures.tolist()


class _Pass:
    """What one forward pass carries from the clustering hook to the reconstruction hook."""

    grid: Grid | None = None
    affinity: torch.Tensor | None = None


def clustered_blocks(config: TokenClusteringConfig, depth: int) -> range:
    """0-based indices of the blocks whose *output* has the clustered length."""
    alpha, beta = config.placement(depth)
    return range(alpha, depth if beta is None else beta - 1)


def install_clustering(site: VitSite, config: TokenClusteringConfig, handle) -> None:
    depth = len(site.blocks)
    alpha, beta = config.placement(depth)
    handle.claim(site.root, "vit_blocks")
    clustering, reconstruction = config.clustering(), config.reconstruction()
    prefix = site.num_prefix
    state = _Pass()

    def batch_first(x: torch.Tensor) -> torch.Tensor:
        return x if site.batch_first else x.transpose(0, 1)

    def record_grid(module, args, output):
        state.grid = tuple(output.shape[-2:])

    def patch_grid(n: int) -> Grid:
        for grid in (state.grid, site.nominal_grid):
            if grid is not None and grid[0] * grid[1] == n:
                return grid
        raise ValueError(
            f"token clustering: {n} patch tokens reach block {alpha} but the patch grid is "
            f"{state.grid or site.nominal_grid}; it needs every patch token in raster order (is patch dropout on?)"
        )

    def cluster(module, args, kwargs):
        masks = [v for k, v in kwargs.items() if "mask" in k and v is not None]
        if masks or any(isinstance(a, torch.Tensor) for a in args[1:]):
            raise ValueError("token clustering does not support attention masks inside the ViT (they fix the length)")
        x = batch_first(args[0])
        patches = x[:, prefix:]
        grid = patch_grid(patches.shape[1])
        result = clustering(patches, grid)
        state.affinity = reconstruction.affinity(patches, result) if beta is not None else None
        handle.stats = ClusteringStats(
            grid, result.grid, alpha, beta, prefix + grid[0] * grid[1], prefix + result.grid[0] * result.grid[1],
            result.temperature.detach(),
        )
        out = batch_first(torch.cat([x[:, :prefix], result.centers], dim=1))
        return (out, *args[1:]), kwargs

    def reconstruct(module, args, output):
        if state.affinity is None:  # block called outside a patched forward pass
            return None
        affinity, state.affinity = state.affinity, None
        x = batch_first(output[0] if isinstance(output, tuple) else output)
        full = batch_first(torch.cat([x[:, :prefix], reconstruction(x[:, prefix:], affinity)], dim=1))
        return (full, *output[1:]) if isinstance(output, tuple) else full

    if site.patch_conv is not None:
        handle.forward_hook(site.patch_conv, record_grid)
    handle.forward_pre_hook(site.blocks[alpha], cluster, with_kwargs=True)
    if beta is not None:
        handle.forward_hook(site.blocks[beta - 1], reconstruct, prepend=True)


def guard_intermediates(owner: nn.Module, config: TokenClusteringConfig, depth: int, handle) -> None:
    """``forward_intermediates`` reshapes every tap to the full patch grid; refuse taps on clustered blocks clearly."""
    original = owner.forward_intermediates
    short = clustered_blocks(config, depth)

    def forward_intermediates(x, indices=None, *args, **kwargs):
        if indices is None:
            taps = range(depth)
        elif isinstance(indices, int):
            taps = range(depth - indices, depth)
        else:
            taps = [i % depth for i in indices]
        bad = sorted(i for i in taps if i in short)
        if bad:
            raise ValueError(
                f"forward_intermediates: blocks {bad} output clustered tokens under token_clustering "
                f"(blocks {short.start} ... {short.stop - 1} of {depth}); tap other blocks or move reconstruct_after"
            )
        return original(x, indices, *args, **kwargs)

    handle.set_attr(owner, "forward_intermediates", forward_intermediates)


def installer(site_of):
    """The vision-blocks stage of a host whose blocks ``site_of(model)`` finds."""

    def install(model, config: TokenClusteringConfig, handle) -> None:
        site = site_of(model)
        install_clustering(site, config, handle)
        if site.intermediates is not None:
            guard_intermediates(site.intermediates, config, len(site.blocks), handle)

    return install


install_hf_clip = installer(SITES["hf_clip_vision"][2])  # LLaVA's tower bridge clusters its CLIP tower with it
for _host, (_, _, _site_of) in SITES.items():
    add_bridge(_host, "token_clustering", installer(_site_of))

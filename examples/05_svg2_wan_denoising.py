"""SVG2 (Sparse VideoGen2) sparse attention on a tiny diffusers Wan transformer, in a hand-written denoising loop.

The transformer is built from a config with random weights (nothing is downloaded). The loop runs a few
flow-matching Euler steps twice, once dense and once patched with SVG2. In the patched run the first
``dense_steps`` steps and the first ``dense_layers`` layers keep the original attention. Every other
self-attention call clusters Q and K with k-means and computes only the blocks of keys holding ``top_p`` of the
attention mass. For each step the script prints the density actually computed per layer and how far the latents
have drifted from the dense run. Random weights spread attention evenly, so these densities say nothing about a
trained Wan (see docs/svg2.md for the real shapes).

    python examples/05_svg2_wan_denoising.py
    OMP_NUM_THREADS=1 python examples/05_svg2_wan_denoising.py   # on a busy CPU (tiny ops gain nothing from threads)
"""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

import vtoken

STEPS = 6
torch.manual_seed(0)
transformer = WanTransformer3DModel(  # Wan 2.1's architecture, scaled down: 3 blocks, 2 heads of 32 channels
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=256, ffn_dim=64, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
).eval()
generator = torch.Generator().manual_seed(0)
noise = torch.randn(1, 16, 5, 32, 32, generator=generator)  # latent video: 5 frames of 32x32 -> 5*16*16 = 1280 tokens
prompt_embeds = torch.randn(1, 12, 32, generator=generator)  # stands in for the text encoder's output


def denoise() -> list[torch.Tensor]:
    """Plain flow-matching Euler loop; returns the latents after every step."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(STEPS)
    latents, trajectory = noise.clone(), []
    with torch.no_grad():
        for t in scheduler.timesteps:
            velocity = transformer(hidden_states=latents, timestep=t.expand(len(latents)),
                                   encoder_hidden_states=prompt_embeds).sample
            latents = scheduler.step(velocity, t, latents).prev_sample
            trajectory.append(latents)
    return trajectory


dense = denoise()

# Clusters scaled down to 1280 tokens (the defaults, 100 query / 500 key clusters, are for Wan's 32,760 tokens).
handle = vtoken.patch(transformer, "svg2", top_p=0.5, q_clusters=16, k_clusters=64, dense_steps=2, dense_layers=1)
sparse = denoise()
stats = handle.stats  # SVG2Stats: one record per self-attention call of this generation
handle.remove()  # original attention processors back

# The first sparse step seeds k-means (kmeans_init_iters rounds); later steps warm-start from the previous centroids.
print(f"{'step':>4}  {'density per layer':<24} {'k-means ms':>10} {'sparse attn ms':>14}  latents vs dense")
for step in range(STEPS):
    calls = [c for c in stats.calls if c.step == step]
    density = "  ".join("dense" if c.dense else f"{c.density:.3f}" for c in calls)
    sparse_calls = [c for c in calls if not c.dense]
    kmeans_ms = f"{sum(c.kmeans_ms for c in sparse_calls):.1f}" if sparse_calls else "-"
    attention_ms = f"{sum(c.attention_ms for c in sparse_calls):.1f}" if sparse_calls else "-"
    drift = ((sparse[step] - dense[step]).norm() / dense[step].norm()).item()
    print(f"{step:>4}  {density:<24} {kmeans_ms:>10} {attention_ms:>14}  {100 * drift:.3f}% (relative L2)")
totals = stats.totals()
print(f"mean density: {totals['mean_sparse_density']:.3f} over the {totals['sparse_calls']} sparse calls, "
      f"{totals['mean_density']:.3f} over all {totals['calls']} calls")

"""Token clustering (Expedit) inside a timm ViT: after ``cluster_after`` blocks the 14x14 patch tokens become a 7x7
grid of cluster centres, the later blocks run on those, and reconstruction maps the result back to 14x14, so the
output keeps its shape and no head changes.

The ViT is built from timm's config with random weights (nothing is downloaded), so images/s is what a trained
model of this shape gets, while the feature similarity is only indicative. With a trained model, pass
``pretrained=True`` to ``timm.create_model``; ``vtoken bench-vit --hf`` measures fidelity on trained CLIP weights.

    python examples/03_vit_token_clustering.py
"""

import time

import timm
import torch
import torch.nn.functional as F

import vtoken
from vtoken.evals.shapes.evaluate import make_split

vit = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()  # 12 blocks, 14x14 patches + [CLS]
transform = timm.data.create_transform(**timm.data.resolve_model_data_config(vit))
images = torch.stack([transform(e.image) for e in make_split("test", 4)])  # 224 px ShapesVQA scenes


def features_and_speed(repeats: int = 2) -> tuple[torch.Tensor, float]:
    """``forward_features`` of the batch and the best of ``repeats`` timings as images/s (after a warm-up)."""
    with torch.no_grad():
        vit.forward_features(images)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = vit.forward_features(images)
            times.append(time.perf_counter() - start)
    return out, len(images) / min(times)


dense, dense_speed = features_and_speed()

with vtoken.patch(vit, "token_clustering", cluster_after=4, num_clusters=0.25) as handle:
    clustered, clustered_speed = features_and_speed()
    stats = handle.stats  # ClusteringStats of the last forward pass
print(stats)

depth = len(vit.blocks)
tokens = [stats.tokens_before if i < stats.cluster_after or i >= stats.reconstruct_after else stats.tokens_after
          for i in range(depth)]
print(f"tokens entering each of the {depth} blocks: {tokens}")
print(f"output shape: dense {tuple(dense.shape)}, clustered {tuple(clustered.shape)}")
similarity = F.cosine_similarity(clustered, dense, dim=-1)  # (batch, tokens)
print(f"cosine similarity to dense: [CLS] {similarity[:, 0].mean():.4f}, patch tokens {similarity[:, 1:].mean():.4f}")
print(f"images/s: dense {dense_speed:.1f}, clustered {clustered_speed:.1f} ({clustered_speed / dense_speed:.2f}x)")

# Without reconstruction the later blocks and the output keep the 1 + 49 cluster tokens (e.g. to feed a pooling head).
with vtoken.patch(vit, "token_clustering", cluster_after=4, num_clusters=0.25, reconstruct=False), torch.no_grad():
    print(f"reconstruct=False: output shape {tuple(vit.forward_features(images).shape)}")
with torch.no_grad():
    print("after the patch is removed the ViT is dense again:", torch.equal(vit.forward_features(images), dense))

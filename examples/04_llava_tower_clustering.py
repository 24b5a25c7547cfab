"""Token clustering inside LLaVA's CLIP vision tower, three ways, on the shipped ShapesVQA LLaVA (offline):

A. reconstruct before the projector: the tower gets cheaper, the LLM still sees all 196 visual tokens;
B. ``reconstruct=False``: the LLM gets the 7x7 = 49 cluster tokens, and vtoken shortens the prompt to match;
C. B followed by ToDRE after the projector (two patches on one model, applied in either order).

The ShapesVQA tower has 4 blocks and LLaVA reads the output of the last one (``vision_feature_layer=-1``), so
clustering after block 2 leaves two blocks on cluster tokens. For LLaVA-1.5's 24-block tower see
docs/token_clustering.md.

    python examples/04_llava_tower_clustering.py [--n 40]
"""

import argparse

import vtoken
from vtoken.evals.shapes.evaluate import evaluate, load_shapes_model, make_split

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--n", type=int, default=40, help="ShapesVQA test questions (default 40)")
args = parser.parse_args()

model, processor = load_shapes_model()
questions = make_split("test", args.n)
CLUSTER = dict(cluster_after=2, num_clusters=49)  # 14x14 patches -> 7x7 cluster centres after tower block 2


def accuracy() -> str:
    """ShapesVQA accuracy of ``model`` as it is now, through its own batched generate()."""
    return evaluate(model, processor, questions, batch_size=len(questions), progress=False).summary()


print(f"dense:  {accuracy()}")

# A. Patch the tower itself: by default it reconstructs after its last block, which is what this LLaVA reads.
with vtoken.patch(model.model.vision_tower, "token_clustering", **CLUSTER) as handle:
    print(f"A. reconstructed: {accuracy()}")
    s = handle.stats
    depth = model.config.vision_config.num_hidden_layers
    print(f"   tower blocks {s.cluster_after + 1}-{s.reconstruct_after} of {depth} ran on {s.tokens_after} tokens "
          f"instead of {s.tokens_before}; the LLM still sees "
          f"{s.patch_grid[0] * s.patch_grid[1]} visual tokens")

# B. Patch the LLaVA: the cluster tokens go to the LLM and the prompt's image placeholders shrink to match.
with vtoken.patch(model, "token_clustering", **CLUSTER, reconstruct=False) as handle:
    print(f"B. clusters to the LLM: {accuracy()}")
    s = handle.stats  # the LLaVA's stats; the tower's are in s.vision
    print(f"   the LLM sees {s.visual_tokens_llm[0]} visual tokens per image (a {s.vision.cluster_grid} grid)")

# C. Methods compose (in either order): B's cluster tokens, then ToDRE picks 25 of the 49 after the projector.
with vtoken.patch(model, "token_clustering", **CLUSTER, reconstruct=False), \
        vtoken.patch(model, "todre", keep=25) as handle:
    print(f"C. clusters + ToDRE: {accuracy()}")
    s = handle.stats
    print(f"   ToDRE kept {s.visual_tokens_kept[0]} of the {s.visual_tokens_in[0]} cluster tokens")

print(f"all patches removed: {accuracy()}")

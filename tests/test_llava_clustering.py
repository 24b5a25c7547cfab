"""Token clustering inside LLaVA's CLIP tower: a cheaper tower (reconstruct) or fewer tokens to the LLM, and
composition with a method after the projector."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IMAGE_TOKEN, hooks_of, left_pad, prompt, tiny_llava

import vtoken

CLUSTER = dict(cluster_after=1, num_clusters=16, reconstruct=False)  # 8x8 patches -> 4x4 clusters


@pytest.fixture(scope="module")
def model():
    return tiny_llava(vision_layers=4)  # LLaVA reads hidden_states[-2]: the output of block 3 of 4


def logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_fewer_tokens_to_the_llm_equals_the_unpatched_llm_on_the_clustered_features(model):
    ids, px = prompt(64).unsqueeze(0), torch.randn(1, 3, 112, 112)
    with vtoken.patch(model, "token_clustering", **CLUSTER) as handle:
        out = logits(model, input_ids=ids, pixel_values=px)
        assert handle.stats.visual_tokens_llm == [16] and handle.stats.vision.cluster_grid == (4, 4)
    with vtoken.patch(model.model.vision_tower, "token_clustering", **CLUSTER), torch.no_grad():
        feats = model.model.get_image_features(pixel_values=px, return_dict=True).pooler_output[0]
    assert feats.shape[0] == 16
    short = torch.cat([ids[0, :3], torch.full((16,), IMAGE_TOKEN), ids[0, 67:]])
    embeds = model.model.get_input_embeddings()(short).clone()
    embeds[short == IMAGE_TOKEN] = feats
    torch.testing.assert_close(out, logits(model, inputs_embeds=embeds.unsqueeze(0)), atol=1e-5, rtol=0)


def test_clustered_tower_batch_equals_singles_and_remove_restores(model):
    rows = [prompt(64), prompt(64, after=(7, 8))]
    px = torch.randn(2, 3, 112, 112)
    ids, mask = left_pad(rows)
    ref = logits(model, input_ids=ids, pixel_values=px, attention_mask=mask)
    hooks = hooks_of(model)
    with vtoken.patch(model, "token_clustering", **CLUSTER):
        with torch.no_grad():
            batch = model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=4,
                                   do_sample=False, suppress_tokens=[IMAGE_TOKEN])[:, -4:]
            singles = torch.cat([model.generate(input_ids=r.unsqueeze(0), pixel_values=px[i : i + 1],
                                                attention_mask=torch.ones(1, len(r), dtype=torch.long),
                                                max_new_tokens=4, do_sample=False,
                                                suppress_tokens=[IMAGE_TOKEN])[:, -4:] for i, r in enumerate(rows)])
    assert torch.equal(batch, singles)
    assert torch.equal(logits(model, input_ids=ids, pixel_values=px, attention_mask=mask), ref)
    assert hooks_of(model) == hooks


def test_reconstruction_keeps_the_prompt_and_a_no_op_clustering_is_lossless(model):
    ids, px = prompt(64).unsqueeze(0), torch.randn(1, 3, 112, 112)
    ref = logits(model, input_ids=ids, pixel_values=px)
    with vtoken.patch(model, "token_clustering", cluster_after=1, num_clusters=1.0, iterations=0, k=1):
        torch.testing.assert_close(logits(model, input_ids=ids, pixel_values=px), ref, atol=1e-5, rtol=0)
    with vtoken.patch(model, "token_clustering", cluster_after=1, num_clusters=16) as handle:
        out = logits(model, input_ids=ids, pixel_values=px)  # reconstruct_after defaults to LLaVA's feature layer
        assert handle.stats.cluster_grid == (4, 4) and handle.stats.reconstruct_after == 3
    assert out.shape == ref.shape and not torch.allclose(out, ref)


def test_clustered_tower_composes_with_todre_after_the_projector(model):
    ids, px = prompt(64).unsqueeze(0), torch.randn(1, 3, 112, 112)
    tower = vtoken.patch(model.model.vision_tower, "token_clustering", **CLUSTER)
    try:
        with vtoken.patch(model, "todre", keep=6, stage2=False) as handle:
            out = logits(model, input_ids=ids, pixel_values=px)
            assert handle.stats.visual_tokens_in == [16] and handle.stats.visual_tokens_kept == [6]
            assert out.shape[1] == ids.shape[1] - 64 + 6
            assert int(handle.stats.kept_indices[0].max()) < 16
    finally:
        tower.remove()


@pytest.mark.parametrize("kwargs,message", [
    (dict(cluster_after=3, num_clusters=16, reconstruct=False), "use cluster_after < 3"),
    (dict(cluster_after=1, num_clusters=16, reconstruct_after=4), "use reconstruct_after <= 3"),
])
def test_clustering_placement_is_checked_against_llava_feature_layer(model, kwargs, message):
    hooks = hooks_of(model)
    with pytest.raises(ValueError, match=message):
        vtoken.patch(model, "token_clustering", **kwargs)
    assert hooks_of(model) == hooks


@pytest.mark.parametrize("kwargs", [dict(), dict(reconstruct=False), dict(cluster_after=1, reconstruct=False),
                                    dict(cluster_after=1)])
@pytest.mark.parametrize("vision_layers,read", [(2, 1), (1, 0)])
def test_a_tower_too_shallow_for_llava_feature_layer_is_refused_as_such(kwargs, vision_layers, read):
    """LLaVA reads hidden_states[-2]: the output of block 1 of 2 (or of block 0 of 1, the embeddings), which leaves
    no room for a full-resolution block before clustering and one on the clusters."""
    shallow = tiny_llava(vision_layers=vision_layers)
    hooks = hooks_of(shallow)
    message = (rf"token_clustering cannot apply to this LLaVA's vision tower: LLaVA reads the output of block {read} "
               rf"of {vision_layers} \(vision_feature_layer=-2\).* the feature layer must be the output of block 2 or "
               r"later \(with vision_feature_layer=-2: a tower of at least 3 blocks\)")
    with pytest.raises(ValueError, match=message):
        vtoken.patch(shallow, "token_clustering", **kwargs)
    assert hooks_of(shallow) == hooks


def test_a_three_block_tower_is_deep_enough():
    model = tiny_llava(vision_layers=3)  # LLaVA reads the output of block 2: cluster after 1, one block on clusters
    ids, px = prompt(64).unsqueeze(0), torch.randn(1, 3, 112, 112)
    with vtoken.patch(model, "token_clustering", num_clusters=16, reconstruct=False) as handle:
        logits(model, input_ids=ids, pixel_values=px)
        assert handle.stats.visual_tokens_llm == [16]


def test_clustered_tower_with_beam_search(model):
    ids, px = prompt(64).unsqueeze(0), torch.randn(1, 3, 112, 112)
    with vtoken.patch(model, "token_clustering", **CLUSTER) as handle, torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=3, num_beams=3, num_return_sequences=3,
                             do_sample=False, suppress_tokens=[IMAGE_TOKEN])
        assert handle.stats.visual_tokens_llm == [16, 16, 16]
    assert out.shape == (3, ids.shape[1] + 3)

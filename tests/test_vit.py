"""token_clustering on the three ViT hosts (timm, HF CLIP incl. LLaVA's vision tower, open_clip), tiny random models."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vtoken

NOOP = dict(cluster_after=1, num_clusters=1.0, iterations=0, k=1)  # identity clustering + identity reconstruction


def smooth_images(batch, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(batch, 3, 4, 4, generator=g), size=size, mode="bilinear", align_corners=False)


# -- tiny models -----------------------------------------------------------------------------------------------------
def timm_vit(reg_tokens=0):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10,
                             reg_tokens=reg_tokens).eval()


def clip_vision_config():
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=56,
                patch_size=7)


def hf_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(**clip_vision_config())).eval()


def tiny_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = dict(model_type="clip_vision_model", **clip_vision_config())
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=999, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg).eval()


def llava_ids(image_tokens):
    return torch.cat([torch.tensor([[1, 5, 6]]), torch.full((1, image_tokens), 999), torch.tensor([[7, 8, 9]])], 1)


def open_clip_vit(**kwargs):
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=4, width=64, layers=4, heads=4, mlp_ratio=2.0, output_dim=32,
                             output_tokens=True, **kwargs).eval()


# Each host: (build, forward returning a tuple of output tensors, input image size).
HOSTS = {
    "timm_vit": (timm_vit, lambda m, x: (m.forward_features(x), m(x)), 32),
    "hf_clip_vision": (hf_clip, lambda m, x: tuple(m(pixel_values=x)[:2]), 56),
    "open_clip_vit": (open_clip_vit, lambda m, x: m(x), 32),
}


def run(host, model, x):
    with torch.no_grad():
        return HOSTS[host][1](model, x)


# -- invariants on every host ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", list(HOSTS))
def test_noop_clustering_equals_unpatched(host):
    build, _, size = HOSTS[host]
    model, x = build(), smooth_images(2, size)
    dense = run(host, model, x)
    with vtoken.patch(model, "token_clustering", **NOOP) as handle:
        assert handle.host == host
        patched = run(host, model, x)
    for a, b in zip(patched, dense, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("host", list(HOSTS))
def test_output_shapes_equal_unpatched_and_remove_restores(host):
    build, _, size = HOSTS[host]
    model, x = build(), smooth_images(2, size)
    dense = run(host, model, x)
    keys = list(model.state_dict())
    handle = vtoken.patch(model, "token_clustering", cluster_after=1, num_clusters=16)
    patched = run(host, model, x)
    assert [t.shape for t in patched] == [t.shape for t in dense]
    assert list(model.state_dict()) == keys  # hooks only: the module tree is untouched
    assert handle.stats.tokens_after == 17 and handle.stats.cluster_grid == (4, 4)
    assert not all(torch.equal(a, b) for a, b in zip(patched, dense, strict=True))  # the patch really did something
    handle.remove()
    for a, b in zip(run(host, model, x), dense, strict=True):
        assert torch.equal(a, b)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules() if _ours(m))
    # patch again after remove
    with vtoken.patch(model, "token_clustering", cluster_after=1, num_clusters=16):
        for a, b in zip(run(host, model, x), patched, strict=True):
            torch.testing.assert_close(a, b)


def _ours(module):
    hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
    return any(getattr(h, "__module__", "") == "vtoken.adapters.vit" for h in hooks)


@pytest.mark.parametrize("host", list(HOSTS))
def test_batch_equals_singles(host):
    build, _, size = HOSTS[host]
    model, x = build(), smooth_images(3, size)
    with vtoken.patch(model, "token_clustering", cluster_after=2, num_clusters=16):
        batch = run(host, model, x)
        singles = [run(host, model, x[i : i + 1]) for i in range(3)]
    for j, out in enumerate(batch):
        torch.testing.assert_close(out, torch.cat([s[j] for s in singles]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("host", list(HOSTS))
def test_clustering_reads_nothing_from_the_device_and_compiles_as_one_graph(host):
    """On a GPU a read stalls the host until the device drains, and under torch.compile it splits the graph: the
    median of the admissible pairs once selected them with a boolean mask, and the stats read the temperatures."""
    from vtoken.evals.bench.overhead import OpCounter

    build, call, size = HOSTS[host]
    model, x = build(), smooth_images(2, size)
    with vtoken.patch(model, "token_clustering", cluster_after=1, num_clusters=16) as handle:
        eager = run(host, model, x)
        with torch.no_grad(), OpCounter(model) as counter:
            call(model, x)
        assert sum(segment.syncs for segment in counter.segments) == 0
        torch._dynamo.reset()
        try:
            with torch.no_grad():
                compiled = call(torch.compile(model, backend="eager", fullgraph=True), x)
        finally:
            torch._dynamo.reset()
        for a, b in zip(compiled, eager, strict=True):
            torch.testing.assert_close(a, b)
        assert len(handle.stats.temperature) == 2 and all(t > 0 for t in handle.stats.temperature)


@pytest.mark.parametrize("host", list(HOSTS))
def test_patching_twice_is_an_error(host):
    build, _, _ = HOSTS[host]
    model = build()
    with vtoken.patch(model, "token_clustering", cluster_after=1, num_clusters=16):
        with pytest.raises(ValueError, match="already patched with 'token_clustering'"):
            vtoken.patch(model, "token_clustering", cluster_after=2, num_clusters=16)


@pytest.mark.parametrize("host", list(HOSTS))
def test_invalid_placement_leaves_the_model_unpatched(host):
    build, _, size = HOSTS[host]
    model, x = build(), smooth_images(1, size)
    dense = run(host, model, x)
    with pytest.raises(ValueError, match=r"cluster_after=4 is out of range for this model's 4 blocks"):
        vtoken.patch(model, "token_clustering", cluster_after=4)
    with pytest.raises(ValueError, match=r"reconstruct_after=-4 \(after block 1\) is out of range"):
        vtoken.patch(model, "token_clustering", cluster_after=1, reconstruct_after=-4)
    for a, b in zip(run(host, model, x), dense, strict=True):
        assert torch.equal(a, b)
    vtoken.patch(model, "token_clustering", cluster_after=1).remove()  # nothing was left claimed


@pytest.mark.parametrize("host", list(HOSTS))
def test_too_many_clusters_for_the_input_is_a_clear_error(host):
    build, _, size = HOSTS[host]
    model = build()
    with vtoken.patch(model, "token_clustering", cluster_after=1, num_clusters=100):
        with pytest.raises(ValueError, match=r"num_clusters=100 asks for a 10x10 cluster grid, larger than .*8x8"):
            run(host, model, smooth_images(1, size))


def test_not_a_vit_is_rejected():
    with pytest.raises(ValueError, match="does not support Linear .*timm VisionTransformer"):
        vtoken.patch(nn.Linear(4, 4), "token_clustering")


def test_non_square_cluster_count_is_rejected():
    with pytest.raises(ValueError, match="num_clusters=15 is not a perfect square"):
        vtoken.patch(timm_vit(), "token_clustering", num_clusters=15)


# -- prefix tokens ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_prefix_tokens_pass_through_clustering_untouched(reg_tokens):
    model, x = timm_vit(reg_tokens), smooth_images(2, 32)
    prefix = model.num_prefix_tokens
    seen = []
    # a forward hook sees the block's input as the block ran on it, after every pre-hook
    hook = model.blocks[2].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(x)
        with vtoken.patch(model, "token_clustering", cluster_after=2, num_clusters=16, reconstruct=False) as handle:
            model(x)
    hook.remove()
    dense_in, clustered_in = seen
    assert clustered_in.shape == (2, prefix + 16, 64)
    assert torch.equal(clustered_in[:, :prefix], dense_in[:, :prefix])
    assert handle.stats.tokens_before == prefix + 64


def test_reconstruction_takes_prefix_tokens_from_the_clustered_run():
    model, x = timm_vit(), smooth_images(2, 32)
    with torch.no_grad():
        with vtoken.patch(model, "token_clustering", cluster_after=1, num_clusters=16, reconstruct=False):
            short = model.forward_features(x)
        with vtoken.patch(model, "token_clustering", cluster_after=1, num_clusters=16):
            full = model.forward_features(x)
    assert short.shape == (2, 17, 64) and full.shape == (2, 65, 64)
    torch.testing.assert_close(full[:, 0], short[:, 0])


def test_timm_head_works_on_clustered_tokens_without_reconstruction():
    model, x = timm_vit(), smooth_images(2, 32)
    with torch.no_grad(), vtoken.patch(model, "token_clustering", cluster_after=1, num_clusters=4, reconstruct=False):
        assert model(x).shape == (2, 10)


def test_timm_reconstruction_mid_stack():
    model, x = timm_vit(), smooth_images(2, 32)
    lengths = []
    hooks = [b.register_forward_hook(lambda m, a, out: lengths.append(out.shape[1])) for b in model.blocks]
    with torch.no_grad(), vtoken.patch(model, "token_clustering", cluster_after=1, num_clusters=16,
                                       reconstruct_after=3) as handle:
        model(x)
    for h in hooks:
        h.remove()
    assert lengths == [65, 17, 65, 65] and handle.stats.reconstruct_after == 3


def test_timm_dynamic_image_size_uses_the_input_grid():
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10,
                              dynamic_img_size=True).eval()
    x = smooth_images(1, (24, 40))  # 6 x 10 patches, not the nominal 8 x 8
    with torch.no_grad(), vtoken.patch(model, "token_clustering", cluster_after=1, num_clusters=0.25) as handle:
        out = model.forward_features(x)
    assert out.shape == (1, 61, 64)
    assert handle.stats.patch_grid == (6, 10) and handle.stats.cluster_grid == (3, 5)


def test_forward_intermediates_refuses_clustered_taps_only():
    model, x = timm_vit(), smooth_images(1, 32)
    with torch.no_grad(), vtoken.patch(model, "token_clustering", cluster_after=1, num_clusters=16):
        feats = model.forward_intermediates(x, indices=[0, 3], intermediates_only=True)
        assert [f.shape for f in feats] == [(1, 64, 8, 8)] * 2
        with pytest.raises(ValueError, match=r"blocks \[1, 2\] output clustered tokens"):
            model.forward_intermediates(x, indices=3)
    assert "forward_intermediates" not in model.__dict__


# -- HF CLIP and LLaVA -----------------------------------------------------------------------------------------------
def test_hf_hidden_states_have_the_clustered_length_between_alpha_and_beta():
    model, x = hf_clip(), smooth_images(1, 56)
    with torch.no_grad(), vtoken.patch(model, "token_clustering", cluster_after=1, num_clusters=16,
                                       reconstruct_after=-2):
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states
    assert [h.shape[1] for h in hidden] == [65, 65, 17, 65, 65]


def test_hf_clip_model_is_patched_through_its_vision_tower():
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=clip_vision_config(), projection_dim=16)).eval()
    x = smooth_images(2, 56)
    with torch.no_grad():
        dense = model.get_image_features(pixel_values=x).pooler_output
        with vtoken.patch(model, "token_clustering", **NOOP):
            torch.testing.assert_close(model.get_image_features(pixel_values=x).pooler_output, dense, atol=1e-6,
                                       rtol=0)
        with vtoken.patch(model, "token_clustering", cluster_after=2, num_clusters=16) as handle:
            assert model.get_image_features(pixel_values=x).pooler_output.shape == dense.shape
    assert handle.stats.tokens_after == 17


@pytest.mark.parametrize("hooks_first", [True, False], ids=["recorder-hooks-installed-first", "patched-first"])
def test_llava_noop_logits_equal_unpatched(hooks_first):
    model = tiny_llava()
    ids, x = llava_ids(64), smooth_images(1, 56)
    with torch.no_grad():
        dense = model(input_ids=ids, pixel_values=x).logits if hooks_first else None
        with vtoken.patch(model.model.vision_tower, "token_clustering", reconstruct_after=-2, **NOOP):
            patched = model(input_ids=ids, pixel_values=x).logits
        dense = model(input_ids=ids, pixel_values=x).logits if dense is None else dense
    torch.testing.assert_close(patched, dense, atol=1e-6, rtol=0)


@pytest.mark.parametrize("hooks_first", [True, False], ids=["recorder-hooks-installed-first", "patched-first"])
def test_llava_consumes_a_full_length_reconstructed_hidden_state(hooks_first):
    """LLaVA reads hidden_states[-2]; with reconstruct_after=-2 it must have all 64 patches again."""
    model = tiny_llava()
    ids, x = llava_ids(64), smooth_images(1, 56)
    tower = model.model.vision_tower
    with torch.no_grad():
        if hooks_first:
            model(input_ids=ids, pixel_values=x)
        with vtoken.patch(tower, "token_clustering", cluster_after=1, num_clusters=16, reconstruct_after=-2) as handle:
            features = model.model.get_image_features(pixel_values=x).pooler_output
            logits = model(input_ids=ids, pixel_values=x).logits
            direct = tower(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert handle.stats.reconstruct_after == 3
    assert [f.shape for f in features] == [(64, 64)] and logits.shape == (1, 70, 1000)
    torch.testing.assert_close(features[0], model.model.multi_modal_projector(direct)[0])


def test_llava_without_reconstruction_hands_m_tokens_to_the_projector():
    model = tiny_llava()
    x = smooth_images(2, 56)
    with torch.no_grad(), vtoken.patch(model.model.vision_tower, "token_clustering", cluster_after=1, num_clusters=16,
                                       reconstruct=False) as handle:
        features = model.model.get_image_features(pixel_values=x).pooler_output
        logits = model(input_ids=llava_ids(16).repeat(2, 1), pixel_values=x).logits  # prompt shortened by hand
    assert [f.shape for f in features] == [(16, 64), (16, 64)]
    assert logits.shape == (2, 22, 1000) and handle.stats.cluster_grid == (4, 4)


# -- open_clip ----------------------------------------------------------------------------------------------------
def test_open_clip_sequence_first_layout_matches_batch_first():
    from open_clip.transformer import Transformer

    batch_first, x = open_clip_vit(), smooth_images(2, 32)
    seq_first = open_clip_vit()
    seq_first.transformer = Transformer(64, 4, 4, 2.0, batch_first=False)
    seq_first.load_state_dict(batch_first.state_dict())
    for model in (batch_first, seq_first):
        vtoken.patch(model, "token_clustering", cluster_after=1, num_clusters=16)
    for a, b in zip(run("open_clip_vit", seq_first, x), run("open_clip_vit", batch_first, x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_open_clip_clip_model_is_patched_through_visual():
    import open_clip

    vision = dict(image_size=32, patch_size=4, width=64, layers=4, head_width=16, mlp_ratio=2.0)
    text = dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1)
    model = open_clip.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()
    x = smooth_images(2, 32)
    with torch.no_grad():
        dense = model.encode_image(x)
        with vtoken.patch(model, "token_clustering", cluster_after=2, num_clusters=16) as handle:
            patched = model.encode_image(x)
    assert handle.host == "open_clip_vit" and handle.stats.tokens_after == 17
    assert patched.shape == dense.shape and not torch.equal(patched, dense)

"""Bad input gets a clear error naming the argument and what is allowed; a failed patch leaves nothing behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny_models import prompt, tiny_llava, tiny_llava_next

import vtoken
from vtoken import registry


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def assert_clean(model):
    assert not model._forward_pre_hooks and not model.model._forward_pre_hooks and not model.model._forward_hooks
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)
    assert "get_image_features" not in model.model.__dict__


def test_registry_lists_methods_configs_and_hosts():
    registry = vtoken.methods()
    assert {"todre", "random", "pool", "attn_topk"} <= set(registry)
    todre = registry["todre"]
    assert set(todre.hosts) == {"internvl", "llava", "llava_next", "llava_onevision", "qwen_vl"}  # in import order
    assert todre.fields()["keep"] == 0.25 and todre.fields()["tau"] == 0.10 and todre.fields()["rule"] == "maxsum"
    assert {"internvl", "llava", "llava_next", "llava_onevision", "qwen_vl"} <= set(vtoken.hosts())


def names(cell: str) -> set[str]:
    """The names of a docs table cell listing ``name (remark), name, ...``."""
    return {part.strip().split(" ")[0].strip("`") for part in re.sub(r"\([^)]*\)", "", cell).split(",") if part.strip()}


@pytest.mark.parametrize("stage", ["boundary", "in_llm", "tower_attention"])
def test_the_design_documents_stage_table_is_the_registrys(stage):
    design = (Path(__file__).parent.parent / "docs" / "design.md").read_text()
    row = next(line for line in design.splitlines() if line.startswith(f"| `{stage}` |"))
    _, _, methods, hosts = row.strip("| ").split(" | ")
    assert names(methods) == {name for name, info in vtoken.methods().items() if stage in info.stages}
    assert names(hosts) == {name for name, host in registry.host_registry().items() if stage in host.stages}


def test_unknown_method_lists_known_ones(model):
    with pytest.raises(ValueError, match=r"unknown method 'fastv'; known methods: .*attn_topk.*todre"):
        vtoken.patch(model, "fastv")


def test_unknown_argument_lists_valid_ones(model):
    with pytest.raises(ValueError, match=r"unknown argument\(s\) 'budget' for method 'todre'; valid arguments: keep"):
        vtoken.patch(model, "todre", budget=64)


def test_unsupported_model_is_named(model):
    with pytest.raises(ValueError, match=r"method 'todre' does not support Linear .*supported: .*LlavaForConditional"):
        vtoken.patch(torch.nn.Linear(2, 2), "todre")


@pytest.mark.parametrize("keep,message", [
    (0, "keep=0 is out of range"),
    (-3, "keep=-3 is out of range"),
    (1.5, r"keep=1.5 is out of range: a float budget is the fraction kept, in \(0, 1\]"),
    (0.0, "keep=0.0 is out of range"),
    (True, "keep must be an int"),
    ("64", "keep must be an int"),
    (65, "keep=65 is larger than the 64 visual tokens per image"),
])
def test_bad_budgets(model, keep, message):
    with pytest.raises(ValueError, match=message):
        vtoken.patch(model, "todre", keep=keep)
    assert_clean(model)


def test_budget_larger_than_this_inputs_tokens_is_reported_at_run_time():
    model = tiny_llava_next()
    px, sizes = torch.randn(1, 5, 3, 56, 56), torch.tensor([[56, 56]])  # 36 visual tokens
    with vtoken.patch(model, "todre", keep=50), pytest.raises(ValueError, match="keep=50 is larger than the 36"):
        model(input_ids=prompt(36).unsqueeze(0), pixel_values=px, image_sizes=sizes)


@pytest.mark.parametrize("method,kwargs,message", [
    ("todre", dict(rule="kcenter"), r"rule='kcenter' is not allowed; choose one of 'maxsum', 'maxmin'"),
    ("todre", dict(pivot="mean"), r"pivot='mean' is not allowed"),
    ("todre", dict(tau=1.5), r"tau=1.5 is out of range; allowed: \[0.0, 1.0\]"),
    ("todre", dict(stage2_layer=3), r"stage2_layer=3 is out of range; allowed: \[0, 2\]"),
    ("todre", dict(stage2="yes"), r"stage2='yes' is not allowed"),
    ("attn_topk", dict(layer=4), r"layer=4 is out of range; allowed: \[1, 3\]"),
    ("attn_topk", dict(layer=0), r"layer=0 is out of range"),
    ("random", dict(seed=-1), r"seed=-1 is out of range"),
])
def test_bad_method_arguments(model, method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        vtoken.patch(model, method, **kwargs)
    assert_clean(model)  # a failed install leaves no hook behind


def test_patching_twice_is_refused_until_removed(model):
    first = vtoken.patch(model, "todre", keep=16)
    try:
        with pytest.raises(ValueError, match="already patched with 'todre' \\(the same method\\)"):
            vtoken.patch(model, "todre", keep=8)
        with pytest.raises(ValueError, match="already patched with 'todre' .* call .remove\\(\\) on that handle"):
            vtoken.patch(model, "attn_topk")
    finally:
        first.remove()
    assert_clean(model)
    vtoken.patch(model, "attn_topk").remove()


def test_labels_are_refused_while_pruning(model):
    ids = prompt(64).unsqueeze(0)
    with vtoken.patch(model, "todre", keep=16), pytest.raises(ValueError, match="labels are not supported"):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 112, 112), labels=ids)


def test_precomputed_features_from_elsewhere_are_refused(model):
    px = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=px, return_dict=True)
    with vtoken.patch(model, "todre", keep=16), pytest.raises(ValueError, match="must come from this patched model"):
        model(input_ids=prompt(64).unsqueeze(0), mm_encoder_outputs={"image": feats})

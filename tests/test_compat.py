"""The compat module: every upstream internal the adapters read, and the version ranges vtoken declares.

The first test is the tripwire for upstream renames: if a transformers release passes decoder layers a keyword the
in-LLM hooks do not know (as 5.24 did when ``past_key_values`` became ``cache``), it fails here, not in a user's run.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import IMAGE_TOKEN, prompt, tiny_llava, tiny_llava_next, visual_count

import vtoken
from vtoken.adapters import _compat
from vtoken.adapters.llava import anyres_views, best_resolution, unpadded_grid

ROOT = Path(__file__).resolve().parents[1]


def inputs_for(model, next_: bool) -> dict:
    if next_:
        pixels, sizes = torch.randn(1, 5, 3, 56, 56), torch.tensor([[112, 84]])
        ids = prompt(visual_count(model, pixels, sizes)[0]).unsqueeze(0)
        return dict(input_ids=ids, pixel_values=pixels, image_sizes=sizes, attention_mask=torch.ones_like(ids))
    ids = prompt(64).unsqueeze(0)
    return dict(input_ids=ids, pixel_values=torch.randn(1, 3, 112, 112), attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("next_", [False, True], ids=["llava", "llava_next"])
def test_decoder_layers_receive_only_known_keywords(next_, attn):
    model = (tiny_llava_next if next_ else tiny_llava)(attn)
    seen: set[str] = set()

    def record(module, args, kwargs):
        seen.update(kwargs)

    hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in model.model.language_model.layers]
    inputs = inputs_for(model, next_)
    with torch.no_grad():
        model(**inputs)
        model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0, suppress_tokens=[IMAGE_TOKEN])
    for hook in hooks:
        hook.remove()
    assert _compat.unknown_layer_kwargs(dict.fromkeys(seen)) == [], (
        f"decoder layers now receive {sorted(seen)}; teach adapters/_compat.py which ones to slice or pass")
    assert "position_embeddings" in seen and "attention_mask" in seen  # what the hooks slice is still there


def test_an_unknown_per_token_keyword_is_refused_not_misaligned():
    model = tiny_llava()
    inputs = inputs_for(model, False)
    layer0 = model.model.language_model.layers[0]

    def add_keyword(module, args, kwargs):
        return args, {**kwargs, "token_type_ids": torch.zeros(1, inputs["input_ids"].shape[1])}

    extra = layer0.register_forward_pre_hook(add_keyword, with_kwargs=True)  # runs before vtoken's own hook
    try:
        with vtoken.patch(model, "attn_topk", keep=0.5), pytest.raises(RuntimeError, match="token_type_ids"):
            model(**inputs)
    finally:
        extra.remove()


def test_the_cache_is_found_by_type_whatever_its_keyword():
    from transformers import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPast

    cache = DynamicCache()
    assert _compat.find_cache({"cache": cache, "use_cache": True}) is cache
    assert _compat.find_cache({"past_key_values": cache}) is cache
    assert _compat.find_cache({"use_cache": True}) is None
    assert _compat.find_cache(BaseModelOutputWithPast(last_hidden_state=torch.zeros(1), past_key_values=cache)) is cache
    assert _compat.is_dynamic_cache(cache)


def test_a_transformers_without_encoder_outputs_is_refused_and_nothing_stays_patched():
    model = tiny_llava()
    inputs = inputs_for(model, False)
    with torch.no_grad():
        reference = model(**inputs).logits
    original = model.model.forward

    def old_forward(input_ids=None, pixel_values=None, attention_mask=None, **kwargs):  # no mm_encoder_outputs
        return original(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **kwargs)

    model.model.forward = old_forward
    with pytest.raises(RuntimeError, match="mm_encoder_outputs"):
        vtoken.patch(model, "todre", keep=16)
    del model.model.forward
    assert not model.model._forward_pre_hooks and "get_image_features" not in model.model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


SIZES = [[112, 84], [56, 56], [84, 112], [1000, 37], [37, 1000], [336, 672], [672, 336], [500, 501], [1, 1],
         [2000, 15], [57, 55], [224, 448]]
PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]


@pytest.mark.parametrize("size", SIZES)
def test_anyres_geometry_matches_transformers(size):
    llava_next = pytest.importorskip("transformers.models.llava_next.modeling_llava_next")
    tile, grid = 56, 4
    assert anyres_views(size, PINPOINTS, tile) == llava_next.image_size_to_num_patches(size, PINPOINTS, tile)
    ph, pw = llava_next.get_anyres_image_grid_shape(size, PINPOINTS, tile)
    assert best_resolution(size, PINPOINTS) == (ph * tile, pw * tile)
    expected = llava_next.unpad_image(torch.empty(1, ph * grid, pw * grid), size).shape[1:]
    assert unpadded_grid(size, PINPOINTS, tile, grid) == tuple(expected)


def pyproject_requirements() -> list[str]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + [d for deps in project["optional-dependencies"].values() for d in deps]


def test_declared_ranges_are_pyprojects():
    declared = pyproject_requirements()
    ranges = _compat.declared_ranges()
    if not ranges:
        pytest.skip("vtoken is not installed (no metadata to read the ranges from)")
    for name, spec in ranges.items():
        line = next(d for d in declared if d.lower().replace("_", "-").startswith(name))
        from packaging.requirements import Requirement

        assert Requirement(line).specifier == Requirement(f"{name}{spec}").specifier
        assert "<" in spec, f"{name} needs an upper bound (the next untested release)"


def test_floor_file_pins_every_lower_bound():
    from packaging.requirements import Requirement
    from packaging.version import Version

    declared = pyproject_requirements()
    floor = {}
    for line in (ROOT / ".ci" / "floor.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            floor[req.name.lower()] = Version(next(iter(req.specifier)).version)
    for line in declared:
        req = Requirement(line)
        lower = [s.version for s in req.specifier if s.operator == ">="]
        if lower:
            assert floor.get(req.name.lower()) == Version(lower[0]), f"{req.name}: floor.txt must pin {lower[0]}"


def test_untested_versions_are_named_once():
    ranges = {"transformers": ">=5.18,<5.25", "timm": ">=1.0.3,<2"}
    assert _compat.untested_versions({"transformers": "5.24.0", "timm": "1.0.31"}, ranges) == []
    lines = _compat.untested_versions({"transformers": "5.26.1", "timm": None}, ranges)
    assert lines == ["transformers 5.26.1 (tested: >=5.18,<5.25)"]
    too_old = _compat.untested_versions({"transformers": "5.17.0"}, ranges)
    assert too_old == ["transformers 5.17.0 (tested: >=5.18,<5.25)"]


def test_the_import_warning_fires_once(monkeypatch):
    monkeypatch.setattr(_compat, "installed_versions", lambda names=_compat.CHECKED: {"transformers": "9.0.0"})
    monkeypatch.setattr(_compat, "declared_ranges", lambda distribution="vtoken": {"transformers": ">=5.18,<5.25"})
    _compat.warn_untested_versions.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="transformers 9.0.0"):
            _compat.warn_untested_versions()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _compat.warn_untested_versions()  # cached: silent the second time
    finally:
        _compat.warn_untested_versions.cache_clear()


def test_the_installed_versions_are_inside_the_ranges():
    """CI installs inside the ranges on both legs; a warning at import there means a range is declared wrong."""
    if not _compat.declared_ranges():
        pytest.skip("vtoken is not installed")
    assert _compat.untested_versions(_compat.installed_versions(), _compat.declared_ranges()) == [], sys.version

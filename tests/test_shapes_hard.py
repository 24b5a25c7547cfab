"""ShapesVQA-Hard: seeded splits, answers re-derived from the scene geometry, a rendering that matches it, and export
to lmms-eval."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest

from vtoken.evals.lmms.tasks import write_task
from vtoken.evals.shapes import hard
from vtoken.evals.shapes.data import COLORS, COUNT_WORDS

N = 80  # 20 questions of each type


@pytest.fixture(scope="module")
def examples():
    return hard.make_split("test", N)


def test_splits_are_seeded_and_prefixes_do_not_depend_on_n(examples):
    again = hard.make_split("test", 5)
    for a, b in zip(again, examples):
        assert (a.question, a.answer, a.scene) == (b.question, b.answer, b.scene)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert [e.question for e in hard.make_split("val", 5)] != [e.question for e in again]
    with pytest.raises(ValueError, match="split must be one of"):
        hard.make_split("dev", 1)


def test_types_cycle_and_answers_are_balanced(examples):
    assert [e.type for e in examples[:8]] == list(hard.QUESTION_TYPES) * 2
    for qtype, answers in hard.ANSWERS.items():
        counts = Counter(e.answer for e in examples if e.type == qtype)
        assert set(counts) <= set(answers)
        cycles = (N // len(hard.QUESTION_TYPES)) // len(answers)
        assert min(counts[a] for a in answers) >= cycles, (qtype, counts)


def rederive(example) -> str:
    """The answer from the scene's geometry, written independently of the generator's question code."""
    scene, meta = example.scene, example.meta
    same = [s for s in scene.shapes if (s.color, s.shape) == (meta["color"], meta["shape"])]
    if example.type == "presence":
        return "yes" if same else "no"
    if example.type == "count":
        return COUNT_WORDS[len(same)]
    (referent,) = same  # digit and nearest questions name a unique shape
    if example.type == "digit":
        return referent.digit
    centres = np.array([(s.cx, s.cy) for s in scene.shapes])
    distance = np.linalg.norm(centres - (referent.cx, referent.cy), axis=1)
    distance[[s is referent for s in scene.shapes].index(True)] = np.inf
    first, second = np.sort(distance)[:2]
    assert first <= hard.NEAREST_MARGIN * second  # the nearest shape is clearly nearest
    return scene.shapes[int(np.argmin(distance))].color


def test_answers_follow_from_the_geometry(examples):
    for e in examples:
        assert rederive(e) == e.answer, (e.index, e.question)


def test_questions_need_both_attributes(examples):
    """Count questions have distractors sharing the colour and distractors sharing the shape; presence "no" answers
    are near misses half of the time."""
    for e in (e for e in examples if e.type == "count"):
        colour, shape = e.meta["color"], e.meta["shape"]
        assert any(s.color == colour and s.shape != shape for s in e.scene.shapes)
        assert any(s.shape == shape and s.color != colour for s in e.scene.shapes)
    misses = [e for e in examples if e.type == "presence" and e.answer == "no"]
    near = [e for e in misses if any(s.color == e.meta["color"] for s in e.scene.shapes)
            and any(s.shape == e.meta["shape"] for s in e.scene.shapes)]
    assert 0 < len(near) < len(misses) + 1


def test_scenes_have_many_shapes_small_ones_and_no_overlap(examples):
    sizes = []
    for e in examples:
        shapes = e.scene.shapes
        assert hard.MIN_SHAPES <= len(shapes) <= hard.MAX_SHAPES
        for a, b in itertools.combinations(shapes, 2):
            assert math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.radius + b.radius + hard.MARGIN - 1e-9
        for s in shapes:
            assert s.radius <= s.cx <= hard.IMAGE_SIZE - s.radius and s.radius <= s.cy <= hard.IMAGE_SIZE - s.radius
            assert s.digit is None or (s.size >= hard.DIGIT_MIN_SIZE and s.shape in hard.DIGIT_SHAPES)
        sizes += [s.size for s in shapes]
    assert min(sizes) <= 16 and sum(s <= 16 for s in sizes) > 0.2 * len(sizes)  # one-patch shapes are common


def inside(s, xx, yy, margin: float = 1.5) -> np.ndarray:
    """Pixels (centres) at least ``margin`` inside a shape, from its geometry alone."""
    dx, dy, r = xx + 0.5 - s.cx, yy + 0.5 - s.cy, s.radius - margin
    if s.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if s.shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= 0.85 * s.radius - margin
    if s.shape == "diamond":
        return abs(dx) + abs(dy) <= r
    # triangle: apex (0, -R), base corners (+-R, R); inside the base and both slanted sides
    R = s.radius
    return (dy <= R - margin) & (2 * abs(dx) - dy <= R - margin * math.sqrt(5))


def test_the_image_shows_every_shape_where_its_geometry_says(examples):
    """Every pixel inside a shape's outline (digits aside) has the shape's colour, and the background is textured
    (many distinct colours)."""
    yy, xx = np.mgrid[: hard.IMAGE_SIZE, : hard.IMAGE_SIZE]
    for e in examples[:20]:
        pixels = np.asarray(e.image).astype(int)
        for s in e.scene.shapes:
            region = inside(s, xx, yy)
            if s.digit is not None:
                left, top, width, height = hard.digit_box(s)
                pad = s.size / 14 + 1
                region &= ~((xx + 0.5 >= left - pad) & (xx + 0.5 <= left + width + pad)
                            & (yy + 0.5 >= top - pad) & (yy + 0.5 <= top + height + pad))
            assert region.sum() > 0
            assert (pixels[region] == COLORS[s.color]).all(-1).mean() > 0.99, (e.index, s)
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2000


def test_digits_are_drawn_differently():
    """Every digit's seven-segment pattern is distinct, and two shapes that differ only in their digit render
    differently."""
    assert len(set(hard.DIGIT_SEGMENTS)) == 10
    scene = hard.random_scene(np.random.default_rng(0))
    big = next(s for s in scene.shapes if s.digit is not None)
    other = hard.HardShape(big.shape, big.color, big.cx, big.cy, big.size, str((int(big.digit) + 1) % 10))
    changed = hard.HardScene(tuple(other if s is big else s for s in scene.shapes), scene.background,
                             scene.texture_seed)
    assert not np.array_equal(np.asarray(hard.render(scene)), np.asarray(hard.render(changed)))


def test_vocabulary_covers_every_prompt_and_answer(examples):
    words = set(hard.vocabulary())
    for e in examples:
        text = f"{e.prompt} {e.answer}".replace("<image>", " ").replace("?", " ? ").replace(":", " : ")
        assert set(text.split()) <= words, set(text.split()) - words


def test_export_to_lmms_eval(examples, tmp_path):
    task = write_task(tmp_path, "shapes_hard", ((e.image, e.question, e.answer) for e in examples[:4]))
    rows = [json.loads(line) for line in (task / "test.jsonl").read_text().splitlines()]
    assert [(r["question"], r["answer"]) for r in rows] == [(e.question, e.answer) for e in examples[:4]]
    assert all((task / r["image"]).is_file() for r in rows) and (task / "shapes_hard.yaml").is_file()


def test_patch_targets_follow_from_the_geometry(examples):
    """Every shape owns at least one patch (small ones the patch under their centre); a shape's patches carry its
    colour, shape, digit, how many shapes share its colour and shape (4 standing for 4 or more: count questions go up
    to 4), and its clearly nearest shape's colour; the background carries colour and shape 0 and no shape's labels;
    every patch carries its row and column."""
    colours = list(COLORS)
    for e in examples[:40]:
        scene = e.scene
        owner = hard.patch_owners(scene, 16)
        targets = hard.patch_targets(scene, 16)
        assert targets.shape == (len(hard.PATCH_TARGETS), 196)
        assert set(owner.tolist()) == set(range(len(scene.shapes))) | ({-1} if (owner < 0).any() else set())
        named = dict(zip(hard.PATCH_TARGETS, targets))
        for i, s in enumerate(scene.shapes):
            mine = owner == i
            centres = np.array([(o.cx, o.cy) for o in scene.shapes])
            distance = np.linalg.norm(centres - (s.cx, s.cy), axis=1)
            distance[i] = np.inf
            first, second = np.sort(distance)[:2]
            nearest = colours.index(scene.shapes[int(np.argmin(distance))].color) \
                if first <= hard.NEAREST_MARGIN * second else -100
            expected = {"color": colours.index(s.color) + 1, "shape": hard.SHAPES.index(s.shape) + 1,
                        "digit": 0 if s.digit is None else int(s.digit) + 1,
                        "pair_count": min(4, sum((o.color, o.shape) == (s.color, s.shape) for o in scene.shapes)),
                        "nearest_color": nearest}
            for name, value in expected.items():
                assert (named[name][mine] == value).all(), (e.index, name, s)
        background = owner < 0
        assert (targets[:2, background] == 0).all() and (targets[2:5, background] == -100).all()
        assert (named["row"] == np.arange(196) // 14).all() and (named["column"] == np.arange(196) % 14).all()
        for a, b in zip(hard.TARGET_CLASSES, targets):
            assert b.max() < a


def test_patch_targets_need_the_models_patch_size():
    scene = hard.random_scene(np.random.default_rng(0))
    with pytest.raises(ValueError, match="patch_size must be 16 .*got 14"):
        hard.patch_targets(scene, 14)

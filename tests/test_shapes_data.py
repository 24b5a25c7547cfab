"""ShapesVQA data: determinism, split disjointness, balance, and every answer re-derived from the scene."""

import hashlib
import re
from collections import Counter

import numpy as np
import pytest

from vtoken.evals.shapes import data as sd


def image_hash(image) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def cell_of(x: float) -> int:
    """Grid row/column of a pixel coordinate, from the documented layout (64 px cells inside a 16 px border)."""
    return int((x - 16) // 64)


def solve(scene: sd.Scene, question: str) -> str:
    """Answer a question from the scene metadata alone, with geometry (pixel centres), not the generator's code."""
    if m := re.fullmatch(r"what color is the shape in the (.+)\?", question):
        row_names, col_names = ("top", "middle", "bottom"), ("left", "middle", "right")
        words = m.group(1).split()
        row, col = (1, 1) if words == ["center"] else (row_names.index(words[0]), col_names.index(words[1]))
        inside = [s for s in scene.shapes if cell_of(s.cx) == col and cell_of(s.cy) == row]
        assert len(inside) == 1, question
        return inside[0].color
    if m := re.fullmatch(r"what shape is directly (left of|right of|above|below) the (\w+) (\w+)\?", question):
        rel, color, shape = m.groups()
        refs = [s for s in scene.shapes if (s.color, s.shape) == (color, shape)]
        assert len(refs) == 1, f"referent not unique: {question}"
        ref = refs[0]
        row, col = cell_of(ref.cy), cell_of(ref.cx)
        same_line = [s for s in scene.shapes if s is not ref and (
            cell_of(s.cy) == row if rel in ("left of", "right of") else cell_of(s.cx) == col)]
        side = {
            "left of": lambda s: ref.cx - s.cx, "right of": lambda s: s.cx - ref.cx,
            "above": lambda s: ref.cy - s.cy, "below": lambda s: s.cy - ref.cy,
        }[rel]
        hits = sorted((side(s), s.shape) for s in same_line if side(s) > 0)
        assert hits and hits[0][0] < 2 * 64, f"no shape in the neighbouring cell: {question}"
        return hits[0][1]  # the nearest shape on that side, in the adjacent cell
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return ("zero", "one", "two", "three", "four")[sum(s.color == m.group(1) for s in scene.shapes)]
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any((s.color, s.shape) == m.groups() for s in scene.shapes) else "no"
    raise AssertionError(f"unknown question form: {question}")


def check_scene(scene: sd.Scene):
    cells = [(s.row, s.col) for s in scene.shapes]
    assert 3 <= len(cells) <= 6 and len(set(cells)) == len(cells)
    for s in scene.shapes:  # the whole bounding box lies inside the shape's own cell: no overlaps
        left, top = 16 + 64 * s.col, 16 + 64 * s.row
        assert left <= s.cx - s.size / 2 and s.cx + s.size / 2 <= left + 64
        assert top <= s.cy - s.size / 2 and s.cy + s.size / 2 <= top + 64
        assert abs(s.cx - left - 32) <= s.size / 4 and abs(s.cy - top - 32) <= s.size / 4  # covers the centre


def test_splits_are_deterministic_and_prefix_stable():
    a, b = sd.make_split("test", 12), sd.make_split("test", 12)
    assert [(e.question, e.answer, e.scene) for e in a] == [(e.question, e.answer, e.scene) for e in b]
    assert [image_hash(e.image) for e in a] == [image_hash(e.image) for e in b]
    short = sd.make_split("test", 5)
    assert [e.scene for e in short] == [e.scene for e in a[:5]]
    assert sd.render(a[3].scene).tobytes() == a[3].image.tobytes()  # image re-renders from the metadata


def test_splits_are_disjoint():
    hashes = {split: {image_hash(e.image) for e in sd.make_split(split, 60)} for split in sd.SPLIT_SEEDS}
    assert all(len(h) == 60 for h in hashes.values())
    assert not hashes["train"] & hashes["val"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]


def test_every_answer_matches_the_scene():
    examples = sd.make_split("test", 200) + sd.make_split("val", 40)
    for e in examples:
        check_scene(e.scene)
        assert e.answer in sd.ANSWERS[e.type]
        assert solve(e.scene, e.question) == e.answer, e.question
    rng = np.random.default_rng(0)
    for _ in range(40):
        scene = sd.random_scene(rng)
        qa = sd.scene_questions(scene, rng, 6)
        check_scene(scene)
        assert len({q for _, q, _, _ in qa}) == len(qa) >= 4
        for _, question, answer, _ in qa:
            assert solve(scene, question) == answer, question


def test_image_shows_the_scene():
    for e in sd.make_split("val", 8):
        pixels = np.asarray(e.image).astype(int)
        for s in e.scene.shapes:  # the centre (and a point a bit below it, inside every shape) has its colour
            for dy in (0, s.size / 6):
                got = pixels[int(s.cy + dy), int(s.cx)]
                assert np.abs(got - np.array(sd.COLORS[s.color])).max() <= 2, (s, got)
        occupied = {(s.row, s.col) for s in e.scene.shapes}
        for r in range(3):
            for c in range(3):
                if (r, c) not in occupied:  # empty cells are light background
                    top, left = 16 + 64 * r, 16 + 64 * c
                    block = pixels[top + 3 : top + 61, left + 3 : left + 61]
                    assert block.mean() > 190 and block.std() < 15


def test_answers_are_balanced_per_type():
    examples = sd.make_split("test", 4 * 60)
    for t in sd.QUESTION_TYPES:
        counts = Counter(e.answer for e in examples if e.type == t)
        assert set(counts) == set(sd.ANSWERS[t])
        assert max(counts.values()) - min(counts.values()) <= 1, (t, counts)


def test_vocabulary_covers_every_question():
    vocab = set(sd.vocabulary())
    for e in sd.make_split("train", 80):
        words = e.prompt.replace("<image>", " ").replace("?", " ? ").replace(":", " : ").split()
        assert set(words) <= vocab, set(words) - vocab
        assert e.answer in vocab


def test_patch_targets_describe_each_shape_locally():
    names = dict(zip(sd.PATCH_TARGETS, range(len(sd.PATCH_TARGETS))))
    for e in sd.make_split("val", 12):
        targets = sd.patch_targets(e.scene, 16)
        assert targets.shape == (len(sd.PATCH_TARGETS), 196)
        owned = set()
        for s in e.scene.shapes:
            patch = int(s.cy // 16) * 14 + int(s.cx // 16)  # the patch under the shape's centre
            owned.add(patch)
            got = dict(zip(sd.PATCH_TARGETS, targets[:, patch].tolist()))
            assert got["color"] == list(sd.COLORS).index(s.color) + 1 and got["shape"] == sd.SHAPES.index(s.shape) + 1
            assert got["cell"] == 3 * s.row + s.col and got["color_count"] == e.scene.count(s.color)
            other = e.scene.at(s.row, s.col - 1)
            assert got["shape left of"] == (0 if other is None else sd.SHAPES.index(other.shape) + 1)
            other = e.scene.at(s.row + 1, s.col)
            assert got["shape below"] == (0 if other is None else sd.SHAPES.index(other.shape) + 1)
        background = targets[names["color"]] == 0
        assert background.sum() > 50 and not background[list(owned)].any()
        assert (targets[names["shape"], background] == 0).all()
        assert (targets[names["cell"]:, background] == sd.IGNORE).all()


def test_count_attention_leaves_one_over_count_plus_one_on_cls():
    for e in sd.make_split("val", 8):
        target = sd.count_attention(e.scene, 16)
        assert target.shape == (196, 197)
        colors = sd.patch_targets(e.scene, 16)[0]
        rows = target.sum(1) > 0
        assert np.allclose(target[rows].sum(1), 1.0) and (rows == (colors > 0)).all()
        for s in e.scene.shapes:
            row = target[sd.centre_patch(s, 16)]
            n = e.scene.count(s.color)
            assert row[0] == pytest.approx(1 / (n + 1)) and (row > 0).sum() == n + 1
            assert all(row[1 + sd.centre_patch(o, 16)] > 0 for o in e.scene.shapes if o.color == s.color)


def test_evidence_patches_are_the_shapes_a_question_is_about():
    for e in sd.make_split("test", 40):
        targets = sd.patch_targets(e.scene, 16)
        evidence = sd.evidence_patches(e.type, e.meta, targets)
        if e.answer in ("no", "zero"):
            assert not evidence.any(), e.question
            continue
        about = {
            "color": [s for s in e.scene.shapes if s.region == e.meta.get("region")],
            "relation": [s for s in e.scene.shapes if (s.color, s.shape) == e.meta.get("referent")],
            "count": [s for s in e.scene.shapes if s.color == e.meta.get("color")],
            "presence": [s for s in e.scene.shapes if (s.color, s.shape) == (e.meta.get("color"), e.meta.get("shape"))],
        }[e.type]
        assert about and all(evidence[sd.centre_patch(s, 16)] for s in about), e.question
        owners = {3 * s.row + s.col for s in about}
        assert set(targets[sd.PATCH_TARGETS.index("cell"), evidence].tolist()) == owners, e.question


@pytest.mark.parametrize("split,n", [("dev", 3), ("test", -1), ("test", 2.0)])
def test_bad_split_arguments(split, n):
    with pytest.raises(ValueError, match="split|n must"):
        sd.make_split(split, n)

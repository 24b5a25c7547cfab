"""ShapesVQA-Hard data: cluttered, textured scenes of 8-16 shapes, distractors that share a colour or a shape, small
shapes the size of one patch, and digits drawn on shapes (fine detail).

ShapesVQA (``shapes_data``) saturates for diversity-based selection: 3-6 flat shapes on a near-plain background, so
any rule that picks "different" patches picks the shapes. Here the background is textured and cluttered with thin
strokes, so the most different patches are often clutter; several shapes share each colour and each shape, so a
question needs the conjunction of both; some shapes cover a single 16 px patch; and one question type reads a digit
drawn on a shape, which pooling or merging patches blurs away.

Shapes are placed freely (no grid) without overlapping. Four question types, each answered by one word, generated
answer-first (pick the answer, then draw scenes until one can ask for it) so that answers are balanced per type:

* ``digit``: "what number is on the red square?" (the referent's colour and shape are unique in the scene);
* ``count``: "how many red squares are there?" (0-4; other red shapes and other squares are in the scene);
* ``presence``: "is there a red square?" (half of the "no" answers are near misses: the colour and the shape are
  both in the scene, just not together);
* ``nearest``: "what color is the shape nearest to the red square?" (the nearest centre is at most 3/4 as far as the
  second nearest, so the answer is not a matter of pixels).

Everything is a pure function of ``(split seed, example index)``, as in ShapesVQA; the image size (224 px) and the
16 px patch grid are the same, so the same model family reads both tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vtoken.evals.shapes import data as shapes_data
from vtoken.evals.shapes.data import (
    COLORS,
    COUNT_WORDS,
    IGNORE,
    IMAGE_SIZE,
    PROMPT,
    SHAPES,
    Example,
    centre_patch,
    cycled_answer,
    draw_shapes,
    presence_question,
)

SPLIT_SEEDS = {"train": 4000, "val": 5000, "test": 6000}
MIN_SHAPES, MAX_SHAPES = 8, 16
SMALL = (12.0, 16.0)  # side of a small shape's box in pixels: about one 16 px patch
LARGE = (20.0, 44.0)
DIGIT_MIN_SIZE = 26.0  # shapes at least this big may carry a digit
DIGIT_SHAPES = ("circle", "square", "diamond")  # a triangle's centre has too little room for a legible digit
DIGITS = tuple(str(d) for d in range(10))
NEAREST_MARGIN = 0.75  # nearest centre distance / second nearest, at most
MARGIN = 3.0  # pixels between the boxes' inscribed circles of two shapes
# a dark digit on light fills, a light one on dark fills
DIGIT_INK = {"red": 255, "green": 255, "blue": 255, "purple": 255, "yellow": 0, "orange": 0}
ANSWERS: dict[str, tuple[str, ...]] = {
    "digit": DIGITS,
    "count": COUNT_WORDS,
    "presence": ("yes", "no"),
    "nearest": tuple(COLORS),
}
QUESTION_TYPES = tuple(ANSWERS)
# Seven-segment digits: segments a (top), b (top right), c (bottom right), d (bottom), e (bottom left), f (top left),
# g (middle), as line ends in a unit box (x right, y down).
SEGMENTS = {
    "a": ((0, 0), (1, 0)), "b": ((1, 0), (1, 0.5)), "c": ((1, 0.5), (1, 1)), "d": ((0, 1), (1, 1)),
    "e": ((0, 0.5), (0, 1)), "f": ((0, 0), (0, 0.5)), "g": ((0, 0.5), (1, 0.5)),
}
DIGIT_SEGMENTS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abfgcd")


@dataclass(frozen=True)
class HardShape:
    shape: str
    color: str
    cx: float
    cy: float
    size: float  # side of the bounding box in pixels
    digit: str | None = None

    @property
    def radius(self) -> float:
        return self.size / 2


@dataclass(frozen=True)
class HardScene:
    shapes: tuple[HardShape, ...]
    background: tuple[int, int, int]
    texture_seed: int  # seeds the texture and the clutter strokes, so the image is re-renderable from metadata

    def count(self, color: str, shape: str | None = None) -> int:
        return sum(s.color == color and (shape is None or s.shape == shape) for s in self.shapes)

    def unique(self, color: str, shape: str) -> HardShape | None:
        found = [s for s in self.shapes if s.color == color and s.shape == shape]
        return found[0] if len(found) == 1 else None


# ----------------------------------------------------------------------------------------------------- scenes
def random_scene(rng: np.random.Generator) -> HardScene:
    """8-16 non-overlapping shapes from a per-scene palette of 3-4 colours (so colours and shapes repeat); about a
    third are small (one patch); large circles, squares and diamonds carry a digit with probability 0.6."""
    palette = [list(COLORS)[i] for i in rng.choice(len(COLORS), size=int(rng.integers(3, 5)), replace=False)]
    while True:
        wanted = int(rng.integers(MIN_SHAPES, MAX_SHAPES + 1))
        shapes: list[HardShape] = []
        for _ in range(40 * wanted):
            if len(shapes) == wanted:
                break
            size = float(rng.uniform(*(SMALL if rng.random() < 0.35 else LARGE)))
            cx, cy = (float(v) for v in rng.uniform(size / 2 + 2, IMAGE_SIZE - size / 2 - 2, size=2))
            if all(math.hypot(cx - o.cx, cy - o.cy) >= size / 2 + o.radius + MARGIN for o in shapes):
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                digit = None
                if size >= DIGIT_MIN_SIZE and shape in DIGIT_SHAPES and rng.random() < 0.6:
                    digit = DIGITS[int(rng.integers(len(DIGITS)))]
                shapes.append(HardShape(shape, palette[int(rng.integers(len(palette)))], cx, cy, size, digit))
        if len(shapes) >= MIN_SHAPES:
            break
    grey = rng.integers(150, 230)
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in rng.integers(-25, 26, size=3))
    return HardScene(tuple(shapes), background, int(rng.integers(2**31)))


def digit_box(s: HardShape) -> tuple[float, float, float, float]:
    """(left, top, width, height) of a shape's digit: centred, 40% of the shape's size high, 60% as wide."""
    height = 0.4 * s.size
    width = 0.6 * height
    return s.cx - width / 2, s.cy - height / 2, width, height


def draw_digit(draw: ImageDraw.ImageDraw, s: HardShape, ink) -> None:
    left, top, width, height = digit_box(s)
    stroke = max(2, round(s.size / 14))
    for name in DIGIT_SEGMENTS[int(s.digit)]:
        (x0, y0), (x1, y1) = SEGMENTS[name]
        draw.line([(left + x0 * width, top + y0 * height), (left + x1 * width, top + y1 * height)], fill=ink,
                  width=stroke)


def texture(scene: HardScene, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float background: the base colour, a coarse colour mottle (blocks of about 2-3 patches, smoothed)
    and fine noise."""
    coarse = rng.normal(0.0, 18.0, size=(9, 9, 3)).astype(np.float32)
    mottle = np.asarray(Image.fromarray(np.uint8(np.clip(coarse + 128, 0, 255))).resize(
        (IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), dtype=np.float32) - 128
    fine = rng.normal(0.0, 6.0, size=(IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    return np.asarray(scene.background, dtype=np.float32) + mottle + fine


def draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    """30-50 thin strokes and rings in muted colours (grey-browns, never a shape colour), under the shapes."""
    for _ in range(int(rng.integers(30, 51))):
        tone = int(rng.integers(60, 200))
        muted = tuple(int(np.clip(tone + t, 0, 255)) for t in rng.integers(-20, 21, size=3))
        x, y = rng.uniform(0, IMAGE_SIZE, size=2)
        if rng.random() < 0.7:
            angle, length = rng.uniform(0, math.pi), rng.uniform(8, 40)
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            draw.line([(x, y), end], fill=muted, width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(3, 9)
            draw.ellipse([x - r, y - r, x + r, y + r], outline=muted, width=1)


def render(scene: HardScene) -> Image.Image:
    rng = np.random.default_rng(scene.texture_seed)
    image = Image.fromarray(np.uint8(np.clip(texture(scene, rng), 0, 255)), "RGB")
    draw = ImageDraw.Draw(image)
    draw_clutter(draw, rng)
    draw_shapes(image, scene, [COLORS[s.color] for s in scene.shapes])  # ShapesVQA's outlines
    for s in scene.shapes:
        if s.digit is not None:
            ink = DIGIT_INK[s.color]
            draw_digit(draw, s, (ink, ink, ink))
    return image


# -------------------------------------------------------------------------------------------------- questions
def plural(shape: str) -> str:
    return shape + "s"


def ask_digit(scene: HardScene, answer: str, rng: np.random.Generator):
    referents = [s for s in scene.shapes if s.digit == answer and scene.unique(s.color, s.shape) is s]
    if not referents:
        return None
    s = referents[int(rng.integers(len(referents)))]
    return f"what number is on the {s.color} {s.shape}?", {"color": s.color, "shape": s.shape}


def ask_count(scene: HardScene, answer: str, rng: np.random.Generator):
    """A colour-shape pair with ``answer`` shapes, asked only when the scene also holds that colour on another shape
    and that shape in another colour (so neither attribute alone gives the count)."""
    k = COUNT_WORDS.index(answer)
    pairs = [(c, s) for c in COLORS for s in SHAPES if scene.count(c, s) == k
             and scene.count(c) > k and any(o.shape == s and o.color != c for o in scene.shapes)]
    if not pairs:
        return None
    c, s = pairs[int(rng.integers(len(pairs)))]
    return f"how many {c} {plural(s)} are there?", {"color": c, "shape": s}


def ask_presence(scene: HardScene, answer: str, rng: np.random.Generator):
    pairs = [(c, s) for c in COLORS for s in SHAPES if (scene.count(c, s) > 0) == (answer == "yes")]
    # near misses here have both the colour and the shape in the scene
    near = [(c, s) for c, s in pairs if scene.count(c) > 0 and any(o.shape == s for o in scene.shapes)]
    return presence_question(pairs, near if answer == "no" else [], rng)


def nearest(scene: HardScene, referent: HardShape) -> HardShape | None:
    """The shape whose centre is nearest the referent's, if it is clearly nearest (see ``NEAREST_MARGIN``)."""
    others = sorted((math.hypot(o.cx - referent.cx, o.cy - referent.cy), i)
                    for i, o in enumerate(scene.shapes) if o is not referent)
    (first, i), (second, _) = others[0], others[1]
    return scene.shapes[i] if first <= NEAREST_MARGIN * second else None


def ask_nearest(scene: HardScene, answer: str, rng: np.random.Generator):
    pairs = []
    for s in scene.shapes:
        if scene.unique(s.color, s.shape) is s:
            other = nearest(scene, s)
            if other is not None and other.color == answer:
                pairs.append(s)
    if not pairs:
        return None
    s = pairs[int(rng.integers(len(pairs)))]
    return f"what color is the shape nearest to the {s.color} {s.shape}?", {"color": s.color, "shape": s.shape}


ASK = {"digit": ask_digit, "count": ask_count, "presence": ask_presence, "nearest": ask_nearest}


def scene_questions(scene: HardScene, rng: np.random.Generator, turns: int) -> list[tuple[str, str, str, dict]]:
    """Up to ``turns`` distinct training questions about ``scene`` (``shapes_data.scene_questions`` with these
    types)."""
    return shapes_data.scene_questions(scene, rng, turns, {t: (ANSWERS[t], ASK[t]) for t in QUESTION_TYPES})


def make_example(rng: np.random.Generator, qtype: str, answer: str, max_tries: int = 2000) -> Example:
    for _ in range(max_tries):
        scene = random_scene(rng)
        asked = ASK[qtype](scene, answer, rng)
        if asked is not None:
            question, meta = asked
            return Example(render(scene), question, answer, qtype, scene, meta=meta)
    raise RuntimeError(f"no scene allowed a {qtype!r} question with answer {answer!r} in {max_tries} tries")


def split_example(split: str, index: int) -> Example:
    """Example ``index`` of ``split``: types cycle, and within a type the answers cycle in a seeded order."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {tuple(SPLIT_SEEDS)}; got {split!r}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], 0, index])
    example = make_example(rng, *cycled_answer(SPLIT_SEEDS[split], index, ANSWERS))
    example.index, example.split = index, split
    return example


def make_split(split: str, n: int) -> list[Example]:
    """The first ``n`` examples of ``split`` ("train", "val" or "test"); a prefix does not depend on ``n``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0; got {n!r}")
    return [split_example(split, i) for i in range(n)]


# --------------------------------------------------------------------------------------------- patch labels
PATCH_SIZE = 16  # the models' patches; the position targets have a class per row and per column of them
GRID_SIDE = IMAGE_SIZE // PATCH_SIZE
PATCH_TARGETS = ("color", "shape", "digit", "pair_count", "nearest_color", "row", "column")
TARGET_CLASSES = (len(COLORS) + 1, len(SHAPES) + 1, len(DIGITS) + 1, len(COUNT_WORDS), len(COLORS), GRID_SIDE,
                  GRID_SIDE)


def patch_owners(scene: HardScene, patch_size: int) -> np.ndarray:
    """(patches,) raster order: the shape covering most of each patch if it covers at least a quarter of it
    (``shapes_data.patch_owners``), else -1; a small shape that owns no patch that way owns the patch under its
    centre, so every shape has at least one token."""
    owner = shapes_data.patch_owners(scene, patch_size)
    for i, s in enumerate(scene.shapes):
        if not (owner == i).any():
            owner[centre_patch(s, patch_size)] = i
    return owner


def patch_targets(scene: HardScene, patch_size: int) -> np.ndarray:
    """(len(PATCH_TARGETS), patches) per-patch labels for the tower's auxiliary loss: colour and shape
    (``index + 1``, 0 = background), and on a shape's patches (``IGNORE`` on the background) its digit
    (``digit + 1``, 0 = none), how many shapes of its colour and shape the scene holds (4 = four or more; count
    questions stop at four), and the colour of
    its clearly nearest shape (``IGNORE`` where none is clearly nearest); and on every patch its row and column in
    the patch grid. What the questions ask about a shape is then on that shape's tokens; finding the shape the
    question names is left to the decoder's own attention. No other label depends on where a shape is, and without
    the position labels the tower drops the position codes it starts with by its second block (``vtoken
    probe-position``), which the nearest colour needs."""
    if patch_size != PATCH_SIZE:
        raise ValueError(f"patch_size must be {PATCH_SIZE} (the position targets have {GRID_SIDE} classes); "
                         f"got {patch_size}")
    owner = patch_owners(scene, patch_size)
    colors = list(COLORS)
    per_shape = []
    for s in scene.shapes:
        other = nearest(scene, s)
        per_shape.append([colors.index(s.color) + 1, SHAPES.index(s.shape) + 1,
                          0 if s.digit is None else int(s.digit) + 1, min(scene.count(s.color, s.shape), 4),
                          IGNORE if other is None else colors.index(other.color)])
    rows, columns = np.divmod(np.arange(GRID_SIDE * GRID_SIDE), GRID_SIDE)
    return np.concatenate([shapes_data.spread_targets(owner, per_shape), rows[None], columns[None]])


def vocabulary() -> list[str]:
    """Every word a prompt or answer can contain (for a word-level tokenizer)."""
    texts = [PROMPT.format(question="").replace("<image>", " "), "what number is on the ?",
             "how many are there ?", "is there a an ?", "what color is the shape nearest to the ?",
             " ".join(COLORS), " ".join(SHAPES), " ".join(map(plural, SHAPES))]
    texts += [" ".join(a) for a in ANSWERS.values()]
    words: list[str] = []
    for text in texts:
        for word in text.replace("?", " ? ").replace(":", " : ").split():
            if word not in words:
                words.append(word)
    return words

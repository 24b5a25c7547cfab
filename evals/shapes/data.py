"""ShapesVQA data: seeded scenes of coloured shapes and one-word questions that need specific image regions.

A scene places 3-6 shapes in distinct cells of a 3 x 3 grid (random size, random offset inside the cell, so
shapes never overlap and every shape has exactly one region name). The cells are 64 px squares inside a 16 px
border, so each covers exactly 4 x 4 of a 16 px patch grid, and every shape covers its cell's centre. Four
question types, each answered by one word: the colour of the shape in a region, the shape in the cell next to
a referent, the count of a colour (0-4) and the presence of a colour-shape pair. Questions are generated
answer-first (pick the answer, then draw scenes until one can ask for it), so answers are balanced per type.

Everything is a pure function of ``(split seed, example index)``: a split's first ``n`` examples do not depend
on ``n``, and splits differ only by seed (see ``SPLIT_SEEDS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 224
GRID = 3
CELL = 64  # pixels; the 3 x 3 grid spans [BORDER, IMAGE_SIZE - BORDER)
BORDER = (IMAGE_SIZE - GRID * CELL) // 2
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 80, 225),
    "yellow": (235, 200, 25),
    "purple": (135, 55, 175),
    "orange": (245, 130, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# region names by (row, col); one or two words each, read top to bottom, left to right
REGIONS = (
    ("top left", "top middle", "top right"),
    ("middle left", "center", "middle right"),
    ("bottom left", "bottom middle", "bottom right"),
)
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("color", "relation", "count", "presence")
ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "relation": SHAPES,
    "count": COUNT_WORDS,
    "presence": ("yes", "no"),
}
SPLIT_SEEDS = {"train": 1000, "val": 2000, "test": 3000}
PROMPT = "USER: <image>\n{question} ASSISTANT:"
NEAR_MISS = 0.5  # share of "no" presence questions whose colour or shape is in the scene (just not together)


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    color: str
    row: int
    col: int
    cx: float  # centre in pixels
    cy: float
    size: float  # side of the bounding box in pixels

    @property
    def region(self) -> str:
        return REGIONS[self.row][self.col]


@dataclass(frozen=True)
class Scene:
    shapes: tuple[ShapeSpec, ...]
    background: tuple[int, int, int]
    texture_seed: int  # seeds the light background noise, so the image is re-renderable from metadata
    texture_std: float

    def at(self, row: int, col: int) -> ShapeSpec | None:
        return next((s for s in self.shapes if s.row == row and s.col == col), None)

    def count(self, color: str, shape: str | None = None) -> int:
        return sum(s.color == color and (shape is None or s.shape == shape) for s in self.shapes)


@dataclass
class Example:
    image: Image.Image
    question: str
    answer: str
    type: str
    scene: Scene
    index: int = -1
    split: str = ""
    meta: dict = field(default_factory=dict)  # what the question refers to (region, referent, ...)

    @property
    def prompt(self) -> str:
        return PROMPT.format(question=self.question)


# ----------------------------------------------------------------------------------------------- scenes
def random_scene(rng: np.random.Generator) -> Scene:
    """3-6 shapes in distinct grid cells, colours drawn from a per-scene palette of 2-4 colours so that
    colour counts of 2-4 are common. Sizes are 32-58 px; a shape's centre moves at most a quarter of its size
    from its cell's centre, so it always covers the cell centre."""
    n = int(rng.integers(3, 7))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    palette = rng.choice(len(COLORS), size=int(rng.integers(2, 5)), replace=False)
    names = list(COLORS)
    shapes = []
    for c in sorted(int(c) for c in cells):
        row, col = divmod(c, GRID)
        size = float(rng.uniform(0.5, 0.9) * CELL)
        shift = min(size / 4, (CELL - size) / 2 - 2.0)
        cx = BORDER + (col + 0.5) * CELL + float(rng.uniform(-shift, shift))
        cy = BORDER + (row + 0.5) * CELL + float(rng.uniform(-shift, shift))
        shapes.append(
            ShapeSpec(SHAPES[int(rng.integers(len(SHAPES)))], names[int(rng.choice(palette))], row, col, cx, cy, size)
        )
    grey = int(rng.integers(215, 246))
    tint = rng.integers(-8, 9, size=3)
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    return Scene(tuple(shapes), background, int(rng.integers(2**31)), float(rng.uniform(0.0, 6.0)))


def shape_polygon(s: ShapeSpec) -> list[tuple[float, float]]:
    h = s.size / 2
    if s.shape == "square":
        h *= 0.85  # same visual weight as the circle
        return [(s.cx - h, s.cy - h), (s.cx + h, s.cy - h), (s.cx + h, s.cy + h), (s.cx - h, s.cy + h)]
    if s.shape == "triangle":
        return [(s.cx, s.cy - h), (s.cx + h, s.cy + h), (s.cx - h, s.cy + h)]
    if s.shape == "diamond":
        return [(s.cx, s.cy - h), (s.cx + h, s.cy), (s.cx, s.cy + h), (s.cx - h, s.cy)]
    raise ValueError(f"shape must be one of {SHAPES}; got {s.shape!r}")


def draw_shapes(image: Image.Image, scene: Scene, fills) -> Image.Image:
    """Draw ``scene.shapes`` (anything with ``shape``, ``cx``, ``cy`` and ``size``; ShapesVQA-Hard's too)."""
    draw = ImageDraw.Draw(image)
    for s, fill in zip(scene.shapes, fills):
        if s.shape == "circle":
            h = s.size / 2
            draw.ellipse([s.cx - h, s.cy - h, s.cx + h, s.cy + h], fill=fill)
        else:
            draw.polygon(shape_polygon(s), fill=fill)
    return image


def render(scene: Scene) -> Image.Image:
    """Draw the scene: light, lightly textured background, flat-coloured shapes."""
    rng = np.random.default_rng(scene.texture_seed)
    bg = np.asarray(scene.background, dtype=np.float32)
    noise = rng.normal(0.0, scene.texture_std, size=(IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    pixels = np.clip(bg + noise, 0, 255).astype(np.uint8)
    return draw_shapes(Image.fromarray(pixels, "RGB"), scene, [COLORS[s.color] for s in scene.shapes])


def shape_map(scene: Scene) -> np.ndarray:
    """(H, W) uint8: 0 on the background, ``i + 1`` where ``scene.shapes[i]`` is drawn."""
    image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    return np.asarray(draw_shapes(image, scene, range(1, len(scene.shapes) + 1)))


# -------------------------------------------------------------------------------------------- questions
def ask_color(scene: Scene, answer: str, rng: np.random.Generator):
    targets = [s for s in scene.shapes if s.color == answer]
    if not targets:
        return None
    s = targets[int(rng.integers(len(targets)))]
    return f"what color is the shape in the {s.region}?", {"region": s.region}


NEIGHBOUR = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}


def relation_pairs(scene: Scene) -> list[tuple[str, ShapeSpec, ShapeSpec]]:
    """(relation, referent, answer shape) triples: the referent's colour+shape is unique in the scene and the
    neighbouring grid cell on that side is occupied, so its shape is the nearest one directly on that side
    (same row for left/right, same column for above/below)."""
    out = []
    for ref in scene.shapes:
        if scene.count(ref.color, ref.shape) != 1:
            continue
        for rel, (dr, dc) in NEIGHBOUR.items():
            other = scene.at(ref.row + dr, ref.col + dc)
            if other is not None:
                out.append((rel, ref, other))
    return out


def ask_relation(scene: Scene, answer: str, rng: np.random.Generator):
    pairs = [p for p in relation_pairs(scene) if p[2].shape == answer]
    if not pairs:
        return None
    rel, ref, other = pairs[int(rng.integers(len(pairs)))]
    question = f"what shape is directly {rel} the {ref.color} {ref.shape}?"
    return question, {"relation": rel, "referent": (ref.color, ref.shape), "target_region": other.region}


def ask_count(scene: Scene, answer: str, rng: np.random.Generator):
    k = COUNT_WORDS.index(answer)
    colors = [c for c in COLORS if scene.count(c) == k]
    if not colors:
        return None
    c = colors[int(rng.integers(len(colors)))]
    return f"how many {c} shapes are there?", {"color": c}


def ask_presence(scene: Scene, answer: str, rng: np.random.Generator):
    pairs = [(c, s) for c in COLORS for s in SHAPES if (scene.count(c, s) > 0) == (answer == "yes")]
    # "no": prefer near misses (the colour or the shape is in the scene, just not together) so that spotting one
    # attribute is not enough
    near = [(c, s) for c, s in pairs if scene.count(c) > 0 or any(x.shape == s for x in scene.shapes)]
    return presence_question(pairs, near if answer == "no" else [], rng)


def presence_question(pairs: list[tuple[str, str]], near: list[tuple[str, str]], rng: np.random.Generator):
    """"is there a <colour> <shape>?" about one of ``pairs``, one of the ``near`` misses with probability
    ``NEAR_MISS`` (when there are any)."""
    pairs = near if near and rng.random() < NEAR_MISS else pairs
    c, s = pairs[int(rng.integers(len(pairs)))]
    article = "an" if c[0] in "aeiou" else "a"
    return f"is there {article} {c} {s}?", {"color": c, "shape": s}


ASK = {"color": ask_color, "relation": ask_relation, "count": ask_count, "presence": ask_presence}


def ask(scene: Scene, qtype: str, answer: str, rng: np.random.Generator):
    """A ``(question, meta)`` about ``scene`` whose answer is ``answer``, or None if this scene has none."""
    return ASK[qtype](scene, answer, rng)


def make_example(rng: np.random.Generator, qtype: str, answer: str, max_tries: int = 1000) -> Example:
    """Draw scenes until one can ask a ``qtype`` question with this answer (answer-first keeps types balanced)."""
    for _ in range(max_tries):
        scene = random_scene(rng)
        asked = ask(scene, qtype, answer, rng)
        if asked is not None:
            question, meta = asked
            return Example(render(scene), question, answer, qtype, scene, meta=meta)
    raise RuntimeError(f"no scene allowed a {qtype!r} question with answer {answer!r} in {max_tries} tries")


def split_rng(split: str, index: int) -> np.random.Generator:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {tuple(SPLIT_SEEDS)}; got {split!r}")
    return np.random.default_rng([SPLIT_SEEDS[split], 0, index])


def make_split(split: str, n: int) -> list[Example]:
    """The first ``n`` examples of ``split`` ("train", "val" or "test").

    Types cycle color, relation, count, presence; within a type the answers cycle through all values in a
    seeded order, so any prefix is balanced to within one example per answer.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0; got {n!r}")
    return [split_example(split, i) for i in range(n)]


def split_example(split: str, index: int) -> Example:
    rng = split_rng(split, index)
    qtype, answer = cycled_answer(SPLIT_SEEDS[split], index, ANSWERS)
    example = make_example(rng, qtype, answer)
    example.index, example.split = index, split
    return example


def cycled_answer(seed: int, index: int, answers: dict[str, tuple[str, ...]]) -> tuple[str, str]:
    """(type, answer) of example ``index``: types cycle in ``answers``' order, and within a type the answers cycle
    through a fresh seeded permutation every full cycle, so the order of answers carries no signal."""
    types = list(answers)
    t = index % len(types)
    choices = answers[types[t]]
    turn = index // len(types)
    cycle_rng = np.random.default_rng([seed, 1, t, turn // len(choices)])
    return types[t], choices[int(cycle_rng.permutation(len(choices))[turn % len(choices)])]


def scene_questions(scene, rng: np.random.Generator, turns: int, asks=None) -> list[tuple[str, str, str, dict]]:
    """Up to ``turns`` distinct ``(qtype, question, answer, meta)`` about ``scene`` (training data: each
    question draws a type uniformly, then an answer uniformly among those this scene can ask for, which keeps the
    answer mix close to balanced). ``asks`` maps each type to ``(answers, ask(scene, answer, rng))``; the default
    is ShapesVQA's."""
    asks = asks or {t: (ANSWERS[t], ASK[t]) for t in QUESTION_TYPES}
    types = list(asks)
    qa: list[tuple[str, str, str, dict]] = []
    seen = set()
    for _ in range(4 * turns):
        if len(qa) == turns:
            break
        qtype = types[int(rng.integers(len(types)))]
        answers, ask_one = asks[qtype]
        for a in rng.permutation(len(answers)):
            asked = ask_one(scene, answers[a], rng)
            if asked is not None:
                if asked[0] not in seen:
                    seen.add(asked[0])
                    qa.append((qtype, asked[0], answers[a], asked[1]))
                break
    return qa


PATCH_TARGETS = ("color", "shape", "cell", "color_count") + tuple(f"shape {r}" for r in RELATIONS)
# classes per target: colour/shape + background, cell, colour count 0-6, neighbouring shape + empty, per side
TARGET_CLASSES = (len(COLORS) + 1, len(SHAPES) + 1, GRID * GRID, 7) + (len(SHAPES) + 1,) * len(RELATIONS)
IGNORE = -100


def patch_owners(scene: Scene, patch_size: int, min_cover: float = 0.25) -> np.ndarray:
    """(patches,) raster order: the index in ``scene.shapes`` of the shape covering most of each patch, if it
    covers at least ``min_cover`` of it, else -1 (background)."""
    side = IMAGE_SIZE // patch_size
    pixels = shape_map(scene).astype(np.int64)
    patches = pixels.reshape(side, patch_size, side, patch_size).transpose(0, 2, 1, 3).reshape(side * side, -1)
    counts = np.stack([(patches == i + 1).sum(1) for i in range(len(scene.shapes))], axis=1)
    return np.where(counts.max(1) >= min_cover * patch_size * patch_size, counts.argmax(1), -1)


def patch_targets(scene: Scene, patch_size: int) -> np.ndarray:
    """(len(PATCH_TARGETS), patches) per-patch labels, raster order, for the vision tower's auxiliary loss.

    A patch belongs to a shape as in ``patch_owners``. Colour and shape
    are ``index + 1`` (0 = background); for shape patches, also the grid cell, how many shapes of this colour
    the scene has, and the shape in the neighbouring cell on each side (``index + 1``, 0 = empty cell);
    background patches are ``IGNORE`` there. These are what the questions ask, so they make the tokens answer
    them locally: a question then needs the tokens of the shapes it is about."""
    owner = patch_owners(scene, patch_size)
    colors, shapes = list(COLORS), list(SHAPES)
    per_shape = []
    for s in scene.shapes:
        neighbours = []
        for rel in RELATIONS:
            dr, dc = NEIGHBOUR[rel]
            other = scene.at(s.row + dr, s.col + dc)
            neighbours.append(0 if other is None else shapes.index(other.shape) + 1)
        per_shape.append([colors.index(s.color) + 1, shapes.index(s.shape) + 1, s.row * GRID + s.col,
                          scene.count(s.color), *neighbours])
    return spread_targets(owner, per_shape)


def spread_targets(owner: np.ndarray, per_shape: list[list[int]]) -> np.ndarray:
    """(targets, patches): each patch gets its owning shape's row of ``per_shape`` (``owner`` as ``patch_owners``
    gives it); a background patch gets colour and shape 0 (the first two targets) and ``IGNORE`` for the rest."""
    table = np.asarray(per_shape, dtype=np.int64)[np.maximum(owner, 0)].T
    background = np.array([0, 0] + [IGNORE] * (table.shape[0] - 2))[:, None]
    return np.where(owner[None] >= 0, table, background)


def evidence_patches(qtype: str, meta: dict, targets: np.ndarray) -> np.ndarray:
    """(patches,) bool: the patches a question is about, from its meta and the scene's ``patch_targets``: the
    asked cell (color), the referent (relation), every shape of the colour (count), the colour-shape pair
    (presence; none when the answer is no)."""
    color, shape, cell = (targets[PATCH_TARGETS.index(k)] for k in ("color", "shape", "cell"))
    if qtype == "color":
        row = next(r for r, names in enumerate(REGIONS) if meta["region"] in names)
        return cell == GRID * row + REGIONS[row].index(meta["region"])
    if qtype == "relation":
        wanted_color, wanted_shape = meta["referent"]
    else:
        wanted_color, wanted_shape = meta["color"], meta.get("shape")
    hit = color == list(COLORS).index(wanted_color) + 1
    return hit & (shape == SHAPES.index(wanted_shape) + 1) if wanted_shape is not None else hit


def centre_patch(shape: ShapeSpec, patch_size: int) -> int:
    """Raster index of the patch under a shape's centre."""
    return int(shape.cy // patch_size) * (IMAGE_SIZE // patch_size) + int(shape.cx // patch_size)


def count_attention(scene: Scene, patch_size: int) -> np.ndarray:
    """(patches, 1 + patches) attention target that makes one tower head count: every patch of a shape attends
    equally to [CLS] (key 0) and to the centre patch of each shape of its colour, so the weight left on [CLS] is
    ``1 / (count + 1)``. Rows of background patches are zero (no target)."""
    owner = patch_owners(scene, patch_size)
    target = np.zeros((len(owner), 1 + len(owner)), dtype=np.float32)
    for i, s in enumerate(scene.shapes):
        same = [1 + centre_patch(o, patch_size) for o in scene.shapes if o.color == s.color]
        rows = np.flatnonzero(owner == i)
        target[np.ix_(rows, [0] + same)] = 1.0 / (len(same) + 1)
    return target


def vocabulary() -> list[str]:
    """Every word a prompt or answer can contain (the tokenizer is word-level)."""
    texts = [PROMPT.format(question="").replace("<image>", " ")]
    texts += ["what color is the shape in the ?", "what shape is directly the ?"]
    texts += ["how many shapes are there ?", "is there a an ?"]
    texts += [" ".join(r) for r in REGIONS] + list(RELATIONS) + [" ".join(a) for a in ANSWERS.values()]
    words: list[str] = []
    for text in texts:
        for word in text.replace("?", " ? ").replace(":", " : ").replace(".", " . ").split():
            if word not in words:
                words.append(word)
    return words

"""Shapes: a deterministic synthetic multimodal task that needs no download.

Each item is a small RGB image of 1-3 coloured shapes on a black background and one question
about it. The answer is a function of the image content and of the question's wording alone, so
tiny vision-language models can learn it on a CPU in minutes, and the long "describe" answers
(11-38 words) give speculative decoding room to matter.

Glossary
--------
shape     one drawn object: kind (circle, square, ...), colour, size (small, large) and position
          (top, left, center, right, bottom). Positions in one image are distinct, and so are
          (colour, kind) names, so "the red circle" always names one shape.
scene     the shapes of one image, sorted in the canonical position order of ``POSITIONS``.
topic     what a question asks: describe, count, colours or where.
phrasing  index of a question wording within its topic; it also picks the answer template.
content   ``Content``: topic, scene and the shape asked about; all that the scorer needs.

Splits are disjoint by scene: a scene belongs to "test" when a hash of it falls in one bucket of
``TEST_BUCKETS``, otherwise to "train", so no test image content is ever seen in training.

Export the evaluation set shipped with the lmms-eval task::

    python -m lmms_sd.data.shapes export --out lmms_sd/tasks/shapes/shapes_test.parquet
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230),
    "yellow": (240, 220, 40), "purple": (160, 60, 200), "orange": (245, 140, 20),
}
SIZES: dict[str, float] = {"small": 0.09, "large": 0.14}  # radius, fraction of the canvas
POSITIONS: dict[str, tuple[float, float]] = {  # centre (x, y), fraction of the canvas
    "top": (0.5, 0.18), "left": (0.18, 0.5), "center": (0.5, 0.5),
    "right": (0.82, 0.5), "bottom": (0.5, 0.82),
}
POSITION_PHRASES = {"top": "at the top", "left": "on the left", "center": "in the center",
                    "right": "on the right", "bottom": "at the bottom"}
TOPICS = ("describe", "count", "colours", "where")
SPLITS = ("train", "test")
BACKGROUND = (0, 0, 0)
MAX_SHAPES = 3
TEST_BUCKETS = 8
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
ORDINALS = ("first", "second", "third", "fourth", "fifth")


def _check(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {tuple(allowed)}")


@dataclass(frozen=True)
class Shape:
    """One drawn shape."""

    kind: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        _check(self.kind, SHAPES, "shape kind")
        _check(self.colour, tuple(COLOURS), "colour")
        _check(self.size, tuple(SIZES), "size")
        _check(self.position, tuple(POSITIONS), "position")

    @property
    def name(self) -> str:
        """What a question calls it: "red circle"."""
        return f"{self.colour} {self.kind}"

    @property
    def description(self) -> str:
        """What a description calls it: "large red circle"."""
        return f"{self.size} {self.colour} {self.kind}"


@dataclass(frozen=True)
class Content:
    """What an answer must convey: the question topic, the scene and, for "where", the shape."""

    topic: str
    shapes: tuple[Shape, ...]
    target: int | None = None  # index into ``shapes`` of the shape a "where" question names

    def __post_init__(self) -> None:
        _check(self.topic, TOPICS, "topic")
        order = [list(POSITIONS).index(s.position) for s in self.shapes]
        if not self.shapes or order != sorted(set(order)):
            raise ValueError(f"shapes must be non-empty with distinct positions in canonical "
                             f"order {tuple(POSITIONS)}; got {[s.position for s in self.shapes]}")
        if len({s.name for s in self.shapes}) != len(self.shapes):
            raise ValueError(f"shape names must be distinct; got {[s.name for s in self.shapes]}")
        if (self.topic == "where") != (self.target is not None):
            raise ValueError(f"target must be set exactly for topic 'where'; got topic "
                             f"{self.topic!r} with target {self.target!r}")
        if self.target is not None and not 0 <= self.target < len(self.shapes):
            raise ValueError(f"target {self.target} out of range for {len(self.shapes)} shapes")

    def to_json(self) -> str:
        return json.dumps({"topic": self.topic, "shapes": [asdict(s) for s in self.shapes],
                           "target": self.target}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Content:
        raw = json.loads(text)
        return cls(raw["topic"], tuple(Shape(**s) for s in raw["shapes"]), raw["target"])


@dataclass(frozen=True)
class ShapesItem:
    """One question about one image, with its reference answer."""

    uid: str
    split: str
    content: Content
    phrasing: int
    question: str
    answer: str
    image: Image.Image = field(repr=False)  # RGB, size x size

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()


# ---------------------------------------------------------------------------- answer templates
def _count_phrase(n: int) -> str:
    return f"{NUMBER_WORDS[n]} shape" + ("" if n == 1 else "s")


def _is_are(n: int) -> str:
    return "is" if n == 1 else "are"


def _join(words: Sequence[str]) -> str:
    """["a"] -> "a"; ["a", "b", "c"] -> "a, b and c"."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _colours(c: Content) -> list[str]:
    return list(dict.fromkeys(s.colour for s in c.shapes))


def _describe_scene(c: Content) -> str:
    parts = [f"The image shows {_count_phrase(len(c.shapes))} on a black background."]
    parts += [f"{POSITION_PHRASES[s.position].capitalize()} there is a {s.description}."
              for s in c.shapes]
    return " ".join(parts)


def _describe_list(c: Content) -> str:
    items = [f"a {s.description} {POSITION_PHRASES[s.position]}" for s in c.shapes]
    return f"There {_is_are(len(c.shapes))} {_count_phrase(len(c.shapes))}: {_join(items)}."


def _describe_each(c: Content) -> str:
    parts = [f"I can see {_count_phrase(len(c.shapes))}."]
    parts += [f"A {s.description} is {POSITION_PHRASES[s.position]}." for s in c.shapes]
    return " ".join(parts)


def _describe_detailed(c: Content) -> str:
    subjects = ["It"] if len(c.shapes) == 1 else [f"The {o}" for o in ORDINALS[:len(c.shapes)]]
    parts = [f"This picture contains {_count_phrase(len(c.shapes))}."]
    parts += [f"{subject} is a {s.description} located {POSITION_PHRASES[s.position]}."
              for subject, s in zip(subjects, c.shapes)]
    return " ".join(parts)


def _colours_of_shapes(c: Content) -> str:
    return f"The {'shape is' if len(c.shapes) == 1 else 'shapes are'} {_join(_colours(c))}."


def _colours_in_image(c: Content) -> str:
    colours = _colours(c)
    if len(colours) == 1:
        return f"The only colour in the image is {colours[0]}."
    return f"The colours in the image are {_join(colours)}."


def _where(c: Content) -> Shape:
    assert c.target is not None
    return c.shapes[c.target]


# Per topic: (question template, answer template). "{name}" is the named shape of "where".
Template = tuple[str, Callable[[Content], str]]
TEMPLATES: dict[str, tuple[Template, ...]] = {
    "describe": (
        ("Describe the image.", _describe_scene),
        ("What is in this picture?", _describe_list),
        ("Describe every shape in the image.", _describe_each),
        ("Give a detailed description of the image.", _describe_detailed),
    ),
    "count": (
        ("How many shapes are there?",
         lambda c: f"There {_is_are(len(c.shapes))} {_count_phrase(len(c.shapes))}."),
        ("Count the shapes in the image.",
         lambda c: f"I count {_count_phrase(len(c.shapes))} in the image."),
        ("How many shapes can you see in the picture?",
         lambda c: f"I can see {_count_phrase(len(c.shapes))} in the picture."),
    ),
    "colours": (
        ("What colours are the shapes?", _colours_of_shapes),
        ("Which colours appear in the image?", _colours_in_image),
        ("Name the colours you see.", lambda c: f"I see {_join(_colours(c))}."),
    ),
    "where": (
        ("Where is the {name}?",
         lambda c: f"The {_where(c).name} is {POSITION_PHRASES[_where(c).position]}."),
        ("In which part of the image is the {name}?",
         lambda c: f"It is {POSITION_PHRASES[_where(c).position]} of the image."),
        ("Where can I find the {name}?",
         lambda c: f"You can find the {_where(c).name} {POSITION_PHRASES[_where(c).position]}."),
    ),
}


def question_and_answer(content: Content, phrasing: int) -> tuple[str, str]:
    """The question wording ``phrasing`` of the content's topic and its reference answer."""
    templates = TEMPLATES[content.topic]
    if not 0 <= phrasing < len(templates):
        raise ValueError(f"phrasing {phrasing} out of range for topic {content.topic!r} "
                         f"({len(templates)} phrasings)")
    question, answer = templates[phrasing]
    name = _where(content).name if content.topic == "where" else ""
    return question.format(name=name), answer(content)


# ---------------------------------------------------------------------------- images
def _star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Ten vertices, outer (radius r) and inner (0.45 r) in turn, the first straight up."""
    angles = [math.pi * (i / 5 - 0.5) for i in range(10)]
    radii = [r if i % 2 == 0 else 0.45 * r for i in range(10)]
    return [(cx + rad * math.cos(a), cy + rad * math.sin(a)) for a, rad in zip(angles, radii)]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float,
                fill: tuple[int, int, int]) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        h = 0.85 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif kind == "star":
        draw.polygon(_star_points(cx, cy, r), fill=fill)
    elif kind == "cross":
        t = 0.35 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {SHAPES}")


def render(shapes: Sequence[Shape], size: int = 32,
           offsets: Sequence[tuple[float, float]] | None = None) -> Image.Image:
    """Draw ``shapes`` on a black ``size`` x ``size`` RGB canvas.

    offsets: per shape (dx, dy) added to its position centre, as fractions of the canvas.
    """
    offsets = offsets if offsets is not None else [(0.0, 0.0)] * len(shapes)
    if len(offsets) != len(shapes):
        raise ValueError(f"{len(offsets)} offsets for {len(shapes)} shapes")
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape, (dx, dy) in zip(shapes, offsets):
        x, y = POSITIONS[shape.position]
        _draw_shape(draw, shape.kind, (x + dx) * size, (y + dy) * size, SIZES[shape.size] * size,
                    COLOURS[shape.colour])
    return image


# ---------------------------------------------------------------------------- items
def scene_split(shapes: Sequence[Shape]) -> str:
    """The split a scene belongs to, from a hash of its content."""
    key = ";".join(f"{s.description} {s.position}" for s in shapes)
    return "test" if zlib.crc32(key.encode()) % TEST_BUCKETS == 0 else "train"


def _sample_shapes(rng: random.Random) -> tuple[Shape, ...]:
    positions = rng.sample(list(POSITIONS), rng.randint(1, MAX_SHAPES))
    shapes: list[Shape] = []
    for position in sorted(positions, key=list(POSITIONS).index):
        while True:
            shape = Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)),
                          position)
            if shape.name not in {s.name for s in shapes}:
                break
        shapes.append(shape)
    return tuple(shapes)


def _sample_scene(rng: random.Random, split: str) -> tuple[Shape, ...]:
    while True:
        shapes = _sample_shapes(rng)
        if scene_split(shapes) == split:
            return shapes


def make_items(n: int, seed: int, split: str, topics: Sequence[str] = TOPICS, size: int = 32,
               jitter: float = 0.02) -> list[ShapesItem]:
    """``n`` items of ``split``, topics in turn, phrasings and scenes drawn from ``seed``.

    jitter: the largest shift of a shape from its position centre, as a fraction of the canvas;
    it varies the pixels, never the answer.
    """
    _check(split, SPLITS, "split")
    for topic in topics:
        _check(topic, TOPICS, "topic")
    if n < 0 or not topics:
        raise ValueError(f"need n >= 0 and at least one topic; got n={n}, topics={topics!r}")
    rng = random.Random(f"shapes/{split}/{seed}/{','.join(topics)}")
    items = []
    for i in range(n):
        shapes = _sample_scene(rng, split)
        topic = topics[i % len(topics)]
        target = rng.randrange(len(shapes)) if topic == "where" else None
        content = Content(topic, shapes, target)
        phrasing = rng.randrange(len(TEMPLATES[topic]))
        question, answer = question_and_answer(content, phrasing)
        offsets = [(rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)) for _ in shapes]
        items.append(ShapesItem(f"{split}-{seed}-{i:05d}", split, content, phrasing, question,
                                answer, render(shapes, size, offsets)))
    return items


def corpus_texts(n: int = 2000, seed: int = 0) -> list[str]:
    """Every question and answer of ``n`` training items: a corpus to train a tokenizer on."""
    return [text for item in make_items(n, seed, "train") for text in (item.question, item.answer)]


# ---------------------------------------------------------------------------- scoring
_KIND_WORDS = {**{k: k for k in SHAPES}, **{k + "s": k for k in SHAPES}, "crosses": "cross"}
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large",
               "big": "large"}
_POSITION_WORDS = {"top": "top", "upper": "top", "left": "left", "right": "right",
                   "bottom": "bottom", "lower": "bottom", "center": "center",
                   "centre": "center", "middle": "center"}
_NUMBERS = {**{w: i for i, w in enumerate(NUMBER_WORDS)}, "single": 1}
_COUNT_NOUNS = {"shape", "shapes", "object", "objects"}
_CLAUSE_BREAK = re.compile(r"[.,;:!?\n]+|\band\b|\bwhile\b|\bbut\b")


@dataclass
class _Mention:
    """A shape named in a prediction and the attributes the text gives it."""

    kind: str
    colours: set[str] = field(default_factory=set)
    sizes: set[str] = field(default_factory=set)
    positions: set[str] = field(default_factory=set)

    def agreement(self, shape: Shape) -> int:
        """How many of kind, colour, size and position it states, unambiguously, as ``shape``'s."""
        return ((self.kind == shape.kind) + (self.colours == {shape.colour})
                + (self.sizes == {shape.size}) + (self.positions == {shape.position}))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+", text.lower())


def _attach(mention: _Mention, word: str) -> None:
    if word in COLOURS:
        mention.colours.add(word)
    elif word in _SIZE_WORDS:
        mention.sizes.add(_SIZE_WORDS[word])
    elif word in _POSITION_WORDS:
        mention.positions.add(_POSITION_WORDS[word])


def _mentions(text: str) -> list[_Mention]:
    """Shapes named in ``text``, clause by clause.

    In a clause, a colour or size word belongs to the next shape word (else the last one), a
    position word to the nearest shape word; a clause without a shape word ("It is red.") adds
    its attributes to the previous mention.
    """
    mentions: list[_Mention] = []
    for clause in _CLAUSE_BREAK.split(text.lower()):
        words = _words(clause)
        nouns = [i for i, w in enumerate(words) if w in _KIND_WORDS]
        if not nouns:
            for w in words if mentions else ():
                _attach(mentions[-1], w)
            continue
        new = {i: _Mention(_KIND_WORDS[words[i]]) for i in nouns}
        for i, w in enumerate(words):
            if w in _POSITION_WORDS:
                owner = min(nouns, key=lambda j: abs(j - i))
            else:
                owner = next((j for j in nouns if j > i), nouns[-1])
            _attach(new[owner], w)
        mentions += new.values()
    return mentions


def _stated_count(text: str) -> int | None:
    """The first number directly qualifying "shapes"/"objects" ("three shapes", "2 red shapes")."""
    words = _words(text)
    for i, w in enumerate(words):
        number = int(w) if w.isdigit() else _NUMBERS.get(w)
        if number is not None and _COUNT_NOUNS & set(words[i + 1:i + 4]):
            return number
    return None


def _best_matching(gains: list[list[int]]) -> int:
    """Largest total gain of a one-to-one matching of rows (mentions) to columns (shapes)."""
    best = {0: 0}  # bitmask of matched shapes -> best total so far
    for row in gains:
        extended = dict(best)
        for mask, total in best.items():
            for col, gain in enumerate(row):
                if not mask >> col & 1:
                    key = mask | 1 << col
                    extended[key] = max(extended.get(key, 0), total + gain)
        best = extended
    return max(best.values())


def _score_describe(prediction: str, content: Content) -> float:
    """Matched attribute facts over all facts stated or due: hallucinated shapes, missing shapes,
    wrong attributes and a wrong stated count all lower it."""
    mentions = _mentions(prediction)
    gains = [[m.agreement(s) for s in content.shapes] for m in mentions]
    correct, total = _best_matching(gains), 4 * max(len(mentions), len(content.shapes))
    stated = _stated_count(prediction)
    if stated is not None:
        correct, total = correct + (stated == len(content.shapes)), total + 1
    return correct / total


def _score_count(prediction: str, content: Content) -> float:
    stated = _stated_count(prediction)
    if stated is None:  # a bare number: "Two."
        numbers = [int(w) if w.isdigit() else _NUMBERS[w] for w in _words(prediction)
                   if w.isdigit() or w in _NUMBERS]
        stated = numbers[0] if numbers else None
    return float(stated == len(content.shapes))


def _score_colours(prediction: str, content: Content) -> float:
    """Jaccard index of the colours named and the colours present."""
    named = {w for w in _words(prediction) if w in COLOURS}
    present = {s.colour for s in content.shapes}
    return len(named & present) / len(named | present)


def _score_where(prediction: str, content: Content) -> float:
    """1 for the right position alone, 1/k when it is one of k positions named, else 0."""
    named = {_POSITION_WORDS[w] for w in _words(prediction) if w in _POSITION_WORDS}
    return float(_where(content).position in named) / max(len(named), 1)


_SCORERS: dict[str, Callable[[str, Content], float]] = {
    "describe": _score_describe, "count": _score_count, "colours": _score_colours,
    "where": _score_where,
}


def score(prediction: str, content: Content) -> float:
    """Content accuracy in [0, 1] of ``prediction`` for a question with ``content``.

    Judges what is said, not the template wording: synonyms (big, middle, ...) and any order or
    sentence structure are accepted; a paraphrase of the reference with the same content
    scores 1.0. describe: attribute facts of matched shapes (see ``_score_describe``); count:
    the first stated count is right; colours: Jaccard of colour sets; where: the named position.
    """
    return _SCORERS[content.topic](prediction, content)


# ---------------------------------------------------------------------------- export
def export_rows(items: Sequence[ShapesItem]) -> dict[str, list]:
    """Column-wise rows of the lmms-eval task's parquet file; images as PNG bytes."""
    return {
        "id": [item.uid for item in items],
        "topic": [item.content.topic for item in items],
        "phrasing": [item.phrasing for item in items],
        "question": [item.question for item in items],
        "answer": [item.answer for item in items],
        "content": [item.content.to_json() for item in items],
        "image": [{"bytes": item.png(), "path": None} for item in items],
    }


def export(out: str, n_caption: int = 48, n_qa: int = 48, seed: int = 0, size: int = 32) -> None:
    """Write the evaluation set: ``n_caption`` describe items, then ``n_qa`` mixed questions."""
    import datasets  # deferred: only exporting needs it

    items = (make_items(n_caption, seed, "test", ("describe",), size)
             + make_items(n_qa, seed, "test", ("count", "colours", "where"), size))
    features = datasets.Features({
        "id": datasets.Value("string"), "topic": datasets.Value("string"),
        "phrasing": datasets.Value("int32"), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "content": datasets.Value("string"),
        "image": datasets.Image(),
    })
    datasets.Dataset.from_dict(export_rows(items), features=features).to_parquet(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmms_sd.data.shapes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("export", help="write the evaluation parquet of the shapes tasks")
    cmd.add_argument("--out", required=True, help="parquet file to write")
    cmd.add_argument("--n-caption", type=int, default=48, help="describe items")
    cmd.add_argument("--n-qa", type=int, default=48, help="count/colours/where items")
    cmd.add_argument("--seed", type=int, default=0)
    cmd.add_argument("--size", type=int, default=32, help="image side in pixels")
    args = parser.parse_args(argv)
    export(args.out, args.n_caption, args.n_qa, args.seed, args.size)


if __name__ == "__main__":
    main()

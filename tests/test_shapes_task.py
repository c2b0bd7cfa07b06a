"""The synthetic shapes task: deterministic data, answers that follow the image, a scorer that
judges content rather than wording, and the lmms-eval tasks built offline from the shipped data.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image

from lmms_sd.data import shapes
from lmms_sd.data.shapes import (
    COLOURS,
    NUMBER_WORDS,
    POSITION_PHRASES,
    TEMPLATES,
    TOPICS,
    Content,
    Shape,
    ShapesItem,
    make_items,
    score,
)

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")  # before datasets / lmms_eval are imported, lazily below

TASK_DIR = Path(shapes.__file__).resolve().parents[1] / "tasks"
SHIPPED = TASK_DIR / "shapes" / "shapes_test.parquet"
TASK_NAMES = ("shapes", "shapes_caption", "shapes_qa")

# Three shapes; their reference-style description, and variants with one fault each.
SCENE = (Shape("star", "red", "small", "top"), Shape("circle", "blue", "large", "left"),
         Shape("cross", "green", "small", "center"))
DESCRIBE = Content("describe", SCENE)
GOOD = ("There are three shapes. A small red star is at the top. A large blue circle is on the "
        "left. A small green cross is in the center.")


@pytest.fixture(scope="module")
def items() -> list[ShapesItem]:
    return make_items(200, seed=1, split="train")


# ---------------------------------------------------------------------------- data
def test_same_seed_gives_same_items_and_bytes() -> None:
    first, again = make_items(24, 3, "test"), make_items(24, 3, "test")
    assert first == again  # dataclass equality compares the PIL images pixel by pixel
    assert [i.png() for i in first] == [i.png() for i in again]
    other = make_items(24, 4, "test")
    assert [i.answer for i in first] != [i.answer for i in other]


def test_image_size_is_a_parameter() -> None:
    (item,) = make_items(1, 0, "train", size=64)
    assert item.image.size == (64, 64) and item.image.mode == "RGB"


def test_train_and_test_scenes_are_disjoint() -> None:
    train = {i.content.shapes for i in make_items(300, 0, "train")}
    test = {i.content.shapes for i in make_items(300, 0, "test")}
    assert train and test and not train & test
    assert {shapes.scene_split(s) for s in test} == {"test"}


def test_every_topic_and_phrasing_occurs(items: list[ShapesItem]) -> None:
    seen = {(i.content.topic, i.phrasing) for i in items}
    assert seen == {(t, p) for t in TOPICS for p in range(len(TEMPLATES[t]))}


def test_image_shows_exactly_the_content_colours(items: list[ShapesItem]) -> None:
    for item in items:
        drawn = {rgb for _, rgb in item.image.getcolors()} - {shapes.BACKGROUND}
        assert drawn == {COLOURS[s.colour] for s in item.content.shapes}, item.uid


EXPECTED_CENTRE = {"top": (0.5, 0.2), "left": (0.2, 0.5), "center": (0.5, 0.5),
                   "right": (0.8, 0.5), "bottom": (0.5, 0.8)}  # where a reader would look


@pytest.mark.parametrize("position", list(EXPECTED_CENTRE))
@pytest.mark.parametrize("kind", shapes.SHAPES)
def test_each_shape_is_drawn_where_its_position_says(kind: str, position: str) -> None:
    size = 64
    image = shapes.render([Shape(kind, "red", "large", position)], size=size)
    pixels = [(i % size, i // size) for i, rgb in enumerate(image.getdata())
              if rgb == COLOURS["red"]]
    x = sum(p[0] for p in pixels) / len(pixels) / size
    y = sum(p[1] for p in pixels) / len(pixels) / size
    ex, ey = EXPECTED_CENTRE[position]
    assert abs(x - ex) < 0.08 and abs(y - ey) < 0.08, (x, y)
    assert len(pixels) == sum(1 for rgb in image.getdata() if rgb != shapes.BACKGROUND)


def _positions_named(text: str) -> set[str]:
    return {p for p, phrase in POSITION_PHRASES.items() if phrase in text.lower()}


def _colours_named(text: str) -> set[str]:
    return {c for c in COLOURS if re.search(rf"\b{c}\b", text)}


def test_answers_state_the_content(items: list[ShapesItem]) -> None:
    for item in items:
        content, answer = item.content, item.answer
        n = len(content.shapes)
        if content.topic == "describe":
            clauses = [c.lower() for c in re.split(r"[.,:]| and ", answer)]
            for s in content.shapes:  # some clause names the shape and its position
                assert any(s.description in c and POSITION_PHRASES[s.position] in c
                           for c in clauses), (answer, s)
            assert _positions_named(answer) == {s.position for s in content.shapes}
        if content.topic in ("describe", "count"):
            assert re.search(rf"\b{NUMBER_WORDS[n]} shapes?\b", answer), answer
        if content.topic == "colours":
            assert _colours_named(answer) == {s.colour for s in content.shapes}, answer
        if content.topic == "where":
            target = content.shapes[content.target]
            assert target.name in item.question and _positions_named(answer) == {target.position}


def test_content_round_trips_through_json(items: list[ShapesItem]) -> None:
    for item in items:
        assert Content.from_json(item.content.to_json()) == item.content


@pytest.mark.parametrize("bad, match", [
    ({"kind": "hexagon"}, "shape kind"), ({"colour": "pink"}, "colour"),
    ({"size": "huge"}, "size"), ({"position": "corner"}, "position"),
])
def test_bad_shape_values_are_named(bad: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        replace(SCENE[0], **bad)


def test_contents_that_break_the_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="canonical order"):
        Content("describe", SCENE[::-1])
    with pytest.raises(ValueError, match="distinct"):
        Content("describe", (SCENE[0], replace(SCENE[0], position="bottom")))
    with pytest.raises(ValueError, match="target"):
        Content("where", SCENE)


def test_corpus_covers_every_vocabulary_word() -> None:
    words = set(re.findall(r"[a-z]+", " ".join(shapes.corpus_texts(400)).lower()))
    vocabulary = set(shapes.SHAPES) | set(COLOURS) | set(shapes.SIZES) | set(shapes.POSITIONS)
    assert vocabulary <= words


# ---------------------------------------------------------------------------- scorer
def test_reference_answers_score_one(items: list[ShapesItem]) -> None:
    assert [score(i.answer, i.content) for i in items] == [1.0] * len(items)


def test_every_template_of_the_topic_scores_one(items: list[ShapesItem]) -> None:
    # The scorer must not favour the phrasing the question asked for.
    for item in items:
        for phrasing in range(len(TEMPLATES[item.content.topic])):
            _, answer = shapes.question_and_answer(item.content, phrasing)
            assert score(answer, item.content) == 1.0, answer


@pytest.mark.parametrize("paraphrase", [
    # other order, synonyms (tiny, big, middle), one sentence, no count stated
    ("In the middle sits a tiny green cross, while a big blue circle is on the left and a small "
     "red star is at the top."),
    # attributes given in later sentences about "it"
    ("I see 3 shapes. There is a circle. It is blue and large. It is on the left. A red star is "
     "at the top, small. A small green cross is in the centre."),
    # a numbered list
    "1. small red star, top\n2. large blue circle, left\n3. small green cross, middle",
])
def test_paraphrase_with_the_same_content_scores_one(paraphrase: str) -> None:
    assert score(paraphrase, DESCRIBE) == 1.0


@pytest.mark.parametrize("fault, prediction", [
    ("wrong colour", GOOD.replace("blue circle", "yellow circle")),
    ("wrong size", GOOD.replace("large blue", "small blue")),
    ("wrong position", GOOD.replace("at the top", "at the bottom")),
    ("wrong kind", GOOD.replace("green cross", "green square")),
    ("hedged colour", GOOD.replace("small red star", "small red or blue star")),
    ("wrong count", GOOD.replace("three", "four")),
    ("hallucinated shape", GOOD + " A large purple triangle is at the bottom."),
    ("missing shape", GOOD.replace(" A small green cross is in the center.", "")),
])
def test_a_single_fault_costs_part_of_the_score(fault: str, prediction: str) -> None:
    assert score(GOOD, DESCRIBE) == 1.0
    assert 0.5 < score(prediction, DESCRIBE) < 1.0, fault


def test_partial_credit_grows_with_what_is_right() -> None:
    one_attribute_wrong = score(GOOD.replace("blue circle", "yellow circle"), DESCRIBE)
    two_attributes_wrong = score(GOOD.replace("large blue circle", "small yellow circle"),
                                 DESCRIBE)
    one_shape_only = score("A small red star is at the top.", DESCRIBE)
    assert 1.0 > one_attribute_wrong > two_attributes_wrong > one_shape_only > 0.0
    # 4 facts of 12 (one of three shapes, no count stated).
    assert one_shape_only == pytest.approx(4 / 12)
    assert score("", DESCRIBE) == 0.0 and score("red red red blue", DESCRIBE) == 0.0


def test_repeating_shapes_is_penalised_not_rewarded() -> None:
    looping = GOOD + " A small red star is at the top." * 5
    assert score(looping, DESCRIBE) < score(GOOD, DESCRIBE)


@pytest.mark.parametrize("prediction, expected", [
    ("There are three shapes.", 1.0), ("3", 1.0), ("Three.", 1.0), ("I count 3 shapes.", 1.0),
    ("There are two shapes.", 0.0), ("I see no shapes at all.", 0.0),
])
def test_count_is_right_or_wrong(prediction: str, expected: float) -> None:
    assert score(prediction, replace(DESCRIBE, topic="count")) == expected


@pytest.mark.parametrize("prediction, expected", [
    ("Red, blue and green.", 1.0), ("The shapes are green, red and blue.", 1.0),
    ("Red and blue.", 2 / 3), ("Red, blue, green and purple.", 3 / 4), ("Purple.", 0.0),
])
def test_colours_score_is_the_overlap_of_colour_sets(prediction: str, expected: float) -> None:
    assert score(prediction, replace(DESCRIBE, topic="colours")) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, expected", [
    ("The blue circle is on the left.", 1.0), ("Left side.", 1.0),
    ("It is on the left or at the top.", 0.5), ("It is on the right.", 0.0), ("", 0.0),
])
def test_where_needs_the_named_position(prediction: str, expected: float) -> None:
    assert score(prediction, Content("where", SCENE, target=1)) == expected


# ---------------------------------------------------------------------------- shipped data
def _rows(path: Path) -> list[dict[str, Any]]:
    rows = pq.read_table(path).to_pylist()
    for row in rows:  # compare pixels, not PNG encoder bytes
        row["image"] = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB").tobytes()
    return rows


def test_shipped_parquet_is_what_export_writes(tmp_path: Path) -> None:
    out = tmp_path / "shapes_test.parquet"
    shapes.main(["export", "--out", str(out)])
    shipped = _rows(SHIPPED)
    assert shipped == _rows(out)
    topics = [row["topic"] for row in shipped]
    assert topics.count("describe") == 48 and len(topics) == 96
    assert set(topics) == set(TOPICS)
    assert all(row["split"] == "test" for row in map(_content_split, shipped))


def _content_split(row: dict[str, Any]) -> dict[str, str]:
    return {"split": shapes.scene_split(Content.from_json(row["content"]).shapes)}


def test_task_names_do_not_clash_with_built_in_tasks() -> None:
    # lmms-eval lets built-in names win, so ours must be new; reading its YAMLs is much faster
    # than indexing them with TaskManager.
    import lmms_eval

    declared = re.compile(rf"(?m)^\s*(-|task:|group:|tag:)\s*['\"]?({'|'.join(TASK_NAMES)})"
                          rf"['\"]?\s*$")
    built_in = Path(lmms_eval.__file__).parent / "tasks"
    clashes = [p for p in built_in.rglob("*.yaml") if declared.search(p.read_text("utf-8"))]
    assert not clashes


# ---------------------------------------------------------------------------- lmms-eval
@pytest.fixture(scope="module")
def task_manager() -> Any:
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=False)


@pytest.mark.slow  # importing lmms_eval.tasks alone takes 10-20 s on 2 shared cores
@pytest.mark.parametrize("task_type", ["simple", "chat"])
def test_lmms_eval_builds_the_tasks_offline(task_manager: Any, task_type: str) -> None:
    from lmms_eval.tasks import get_task_dict

    assert set(TASK_NAMES) <= set(task_manager.all_tasks)
    (group,) = get_task_dict(["shapes"], task_manager, task_type=task_type).values()
    assert set(group) == {"shapes_caption", "shapes_qa"}
    caption, qa = group["shapes_caption"], group["shapes_qa"]
    assert {d["topic"] for d in caption.test_docs()} == {"describe"}
    assert {d["topic"] for d in qa.test_docs()} == {"count", "colours", "where"}
    assert len(caption.test_docs()) + len(qa.test_docs()) == 96
    assert caption.config.generation_kwargs["until"] == ["\n\n"]
    doc = caption.test_docs()[0]
    assert caption.doc_to_text(doc) == doc["question"]
    (image,) = caption.doc_to_visual(doc)
    assert image.size == (32, 32) and image.mode == "RGB"
    if task_type == "chat":  # lmms-eval builds the user turn from doc_to_visual + doc_to_text
        (turn,) = caption.doc_to_messages(doc)
        assert [c["type"] for c in turn["content"]] == ["image", "text"]
        assert turn["content"][1]["text"] == doc["question"]


@pytest.mark.slow
def test_process_results_and_aggregation_give_content_accuracy(task_manager: Any) -> None:
    from lmms_eval.tasks import get_task_dict

    qa = get_task_dict(["shapes_qa"], task_manager)["shapes_qa"]
    docs = list(qa.test_docs())
    right = [qa.process_results(d, [d["answer"]])["content_acc"] for d in docs]
    wrong = [qa.process_results(d, ["There are five hexagons."])["content_acc"]
             for d in docs]
    assert right == [1.0] * len(docs) and max(wrong) == 0.0
    assert qa.aggregation()["content_acc"](right + wrong) == pytest.approx(0.5)

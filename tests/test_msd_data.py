"""Conversation data for head training: LLaVA / ShareGPT files written here, their parsing and
errors, assistant-only labels, equality with the adapters' prompts and with ShapesCollator for
one turn, image-safe truncation, and the sharded epoch stream."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from lmms_sd.data.shapes import make_items
from lmms_sd.train.conversations import (
    ConversationCollator,
    ConversationStream,
    load_conversations,
    parse_entry,
)
from lmms_sd.train.data import IGNORE_INDEX, ShapesCollator, assistant_continuation

# llava-hf/llava-1.5-7b-hf's chat template: an assistant turn ends with a space, not "</s>"
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def write_data(folder: Path) -> dict[str, Path]:
    """mm.json (LLaVA mix665k style: images, an int id, a text-only entry, two turns) and
    sharegpt.json (a first turn that is not the human's, assistant role aliases)."""
    items = make_items(3, seed=11, split="train")
    (folder / "images").mkdir(exist_ok=True)
    for i, it in enumerate(items):
        it.image.save(folder / "images" / f"scene{i}.png")
    llava = [{"id": 7, "image": "scene0.png", "conversations": [
                 {"from": "human", "value": "<image>\n" + items[0].question},
                 {"from": "gpt", "value": items[0].answer}]},
             {"id": "two-turns", "image": "scene1.png", "conversations": [
                 {"from": "human", "value": items[1].question + "\n<image>"},
                 {"from": "gpt", "value": items[1].answer},
                 {"from": "human", "value": "And the colours?"},
                 {"from": "gpt", "value": items[2].answer}]},
             {"id": "no-placeholder", "image": "scene2.png", "conversations": [
                 {"from": "human", "value": items[2].question},
                 {"from": "gpt", "value": items[2].answer}]},
             {"id": "text", "conversations": [
                 {"from": "human", "value": "Tell me a story about a red circle."},
                 {"from": "gpt", "value": "A red circle sat on the left."}]}]
    sharegpt = [{"id": "sg0", "conversations": [
                    {"from": "gpt", "value": "Hello! How can I help?"},
                    {"from": "human", "value": "Count to three."},
                    {"from": "chatgpt", "value": "One, two, three."},
                    {"from": "user", "value": "Again."},
                    {"from": "bard", "value": "One two three."}]},
                {"id": "sg1", "conversations": [
                    {"from": "human", "value": "Name a shape."},
                    {"from": "bing", "value": "A square."}]}]
    paths = {"mm": folder / "mm.json", "text": folder / "sharegpt.json"}
    paths["mm"].write_text(json.dumps(llava))
    paths["text"].write_text(json.dumps(sharegpt))
    return paths


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    return write_data(tmp_path)


def test_both_formats_parse(files: dict[str, Path]) -> None:
    mm = load_conversations(files["mm"], files["mm"].parent / "images")
    assert [c.id for c in mm] == ["7", "two-turns", "no-placeholder", "text"]
    assert [len(c.images) for c in mm] == [1, 1, 1, 0]
    assert [t.role for t in mm[1].turns] == ["user", "assistant"] * 2
    first = mm[1].messages()[0]["content"]  # placeholder after the question, newline dropped
    assert first == [{"type": "text", "text": mm[1].turns[0].text.split("\n")[0]},
                     {"type": "image"}]
    assert mm[2].messages()[0]["content"][0] == {"type": "image"}  # no placeholder: first
    text = load_conversations(files["text"])
    assert [t.role for t in text[0].turns] == ["user", "assistant"] * 2  # gpt opener skipped
    assert text[0].turns[0].text == "Count to three."
    dropped = load_conversations(files["mm"], drop_images=True)
    assert all(not c.images and "<image>" not in t.text for c in dropped for t in c.turns)


@pytest.mark.parametrize("entry, message", [
    ({"id": "a", "image": "nope.png", "conversations": [
        {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo"}]},
     "entry 'a': image file"),
    ({"id": "b", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "robot", "value": "Yo"}]},
     "entry 'b', turn 1: unknown role 'robot'"),
    ({"id": "c", "image": "scene0.png", "conversations": [
        {"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "Yo"}]},
     "entry 'c' has 2 <image> placeholders but 1 images"),
    ({"id": "d", "conversations": [
        {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo"}]},
     "entry 'd' has 1 <image> placeholders but 0 images"),
    ({"id": "e", "conversations": []}, "entry 'e' has an empty conversation"),
    ({"id": "f", "conversations": [{"from": "human", "value": "Hi"}]},
     "entry 'f' has no assistant turn"),
])
def test_malformed_entries_fail_naming_the_entry(tmp_path: Path, files: dict[str, Path],
                                                 entry: dict, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([entry]))
    error = FileNotFoundError if "file" in message else ValueError
    with pytest.raises(error, match=message.replace("(", r"\(")):
        load_conversations(path, files["mm"].parent / "images")


def _labelled_texts(tokenizer, input_ids: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """Each run of labelled tokens of a row, decoded."""
    runs, current = [], []
    for tok, lab in zip(input_ids.tolist(), labels.tolist()):
        if lab != IGNORE_INDEX:
            assert lab == tok
            current.append(tok)
        elif current:
            runs, current = runs + [tokenizer.decode(current)], []
    return runs + ([tokenizer.decode(current)] if current else [])


def test_labels_are_exactly_the_assistant_turns(target, files: dict[str, Path]) -> None:
    collate = ConversationCollator(target.processor)
    eos = target.processor.tokenizer.eos_token
    convs = (load_conversations(files["mm"], files["mm"].parent / "images")
             + load_conversations(files["text"]))
    for conv in convs:
        row = collate.encode(conv)
        answers = [t.text for t in conv.turns if t.role == "assistant"]
        texts = _labelled_texts(target.processor.tokenizer, row.input_ids, row.labels)
        assert [t.strip() for t in texts] == [a + eos for a in answers]
        n_image_tokens = int((row.input_ids == collate.image_token_id).sum())
        assert (n_image_tokens > 0) == bool(conv.images)


def test_one_turn_equals_the_adapter_prompt_and_shapes_collator(target, files: dict) -> None:
    mm = load_conversations(files["mm"], files["mm"].parent / "images")
    conv = mm[0]
    question = conv.turns[0].text.removeprefix("<image>\n")
    image = conv.load_images()[0]
    prompt = target.prepare(question, [image]).input_ids
    row = ConversationCollator(target.processor).encode(conv)
    assert torch.equal(row.input_ids[:len(prompt)], prompt.cpu())
    assert (row.labels[:len(prompt)] == IGNORE_INDEX).all()
    assert (row.labels[len(prompt):] != IGNORE_INDEX).all()
    items = make_items(3, seed=11, split="train")[:1]  # the item behind conv
    ours = ConversationCollator(target.processor)([conv])
    theirs = ShapesCollator(target.processor)(items)
    assert torch.equal(ours.input_ids, theirs.input_ids)
    assert torch.equal(ours.labels, theirs.labels)
    assert ours.vision.keys() == theirs.vision.keys()
    assert all(torch.equal(ours.vision[k], theirs.vision[k]) for k in theirs.vision)


def test_text_only_batches_and_truncation_keep_images_whole(target, files: dict) -> None:
    mm = load_conversations(files["mm"], files["mm"].parent / "images")
    collate = ConversationCollator(target.processor)
    assert collate([mm[3]]).vision == {}  # text-only conversation: no vision inputs
    mixed = collate(mm)
    n_images = int((mixed.input_ids == collate.image_token_id).sum())
    assert n_images == 3 * collate.encode(mm[0]).images[0].n_tokens
    full = collate.encode(mm[1])
    first_image = int((full.input_ids == collate.image_token_id).nonzero()[0])
    for length in (first_image + 2, len(full.input_ids) - 2):  # inside the image, after it
        row = ConversationCollator(target.processor, max_length=length).encode(mm[1])
        kept = int((row.input_ids == collate.image_token_id).sum())
        assert len(row.input_ids) <= length
        assert kept == sum(im.n_tokens for im in row.images)  # whole images only
        assert (kept == 0) == (length < len(full.input_ids) - 2)
        assert torch.equal(row.input_ids, full.input_ids[:len(row.input_ids)])


def test_a_template_without_eos_gets_it_appended(target) -> None:
    """llava-hf writes "ASSISTANT: answer " with no "</s>": the turn is labelled " answer</s>"."""
    if target.family != "llava":
        pytest.skip("the llava-hf template")
    processor = copy.deepcopy(target.processor)
    processor.chat_template = LLAVA_HF_TEMPLATE
    eos = processor.tokenizer.eos_token
    history = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    cont = assistant_continuation(processor, eos, history, "Two shapes.")
    assert cont.prompt == "USER: Hi ASSISTANT:" and cont.text == " Two shapes." + eos
    conv = parse_entry({"id": "x", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Two shapes."},
        {"from": "human", "value": "More?"}, {"from": "gpt", "value": "No more."}]}, None)
    row = ConversationCollator(processor).encode(conv)
    texts = _labelled_texts(processor.tokenizer, row.input_ids, row.labels)
    assert [t.strip() for t in texts] == ["Two shapes." + eos, "No more." + eos]
    assert processor.tokenizer.decode(row.input_ids).endswith("USER: More? ASSISTANT: No more."
                                                              + eos)


def test_stream_shards_are_disjoint_reproducible_and_reshuffled() -> None:
    convs = [parse_entry({"id": f"c{i}", "conversations": [
        {"from": "human", "value": "Q"}, {"from": "gpt", "value": f"A{i}"}]}, None)
        for i in range(11)]
    ranks = [ConversationStream(convs, batch_size=2, seed=5, rank=r, world_size=2)
             for r in range(2)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == 3
    for epoch in (0, 1):
        shards = [{c.id for c in s.shard(epoch)} for s in ranks]
        assert not shards[0] & shards[1] and shards[0] | shards[1] == {c.id for c in convs}
    assert [c.id for c in ranks[0].shard(0)] != [c.id for c in ranks[0].shard(1)]
    again = ConversationStream(convs, batch_size=2, seed=5, rank=0, world_size=2)
    assert ([c.id for i in range(6) for c in again.batch(i)]
            == [c.id for i in range(6) for c in ranks[0].batch(i)])
    assert all(len(ranks[1].batch(i)) == 2 for i in range(6))  # the short shard wraps
    other = ConversationStream(convs, batch_size=2, seed=6, rank=0, world_size=2)
    assert [c.id for c in other.shard(0)] != [c.id for c in ranks[0].shard(0)]
    with pytest.raises(ValueError, match="cannot feed 3 processes"):
        ConversationStream(convs[:2], batch_size=1, rank=0, world_size=3)

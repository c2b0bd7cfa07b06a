"""Shapes items as padded training batches for a VLM processor (teacher forcing).

One row = the chat-templated prompt (one user turn: the image, then the question) followed by
the assistant's answer as the chat template writes it, up to and including the EOS token.

  prompt ids   exactly what ``adapter.prepare(question, [image])`` feeds the model at inference
               (the processor expands the image placeholder)
  answer ids   the template's continuation after the generation prompt, e.g. LLaVA
               ``" There are two shapes ...</s>"``, Qwen2-VL ``"There are ...<|im_end|>"``
  labels       the row's ids with -100 on the prompt and on padding (right padding)

``Batch.text_only`` drops the image placeholders for a draft that cannot see the image, the way
``PromptInputs.text_only_ids`` does at inference.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..data.shapes import ShapesItem

IGNORE_INDEX = -100
# processor outputs that carry the images; anything else it returns is rebuilt here
VISION_KEYS = ("pixel_values", "image_grid_thw", "image_sizes", "batch_num_images")


@dataclass
class Batch:
    """A right-padded batch.

    input_ids:      # [B, T] long
    attention_mask: # [B, T] long, 1 on real tokens
    labels:         # [B, T] long, IGNORE_INDEX on the prompt and padding
    vision:         image inputs of the processor (pixel_values, image_grid_thw) and, for
                    Qwen2-VL, ``mm_token_type_ids`` # [B, T]; empty for a text-only batch
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    vision: dict[str, Tensor] = field(default_factory=dict)

    def model_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments of a Hugging Face forward."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.vision}

    def answer_mask(self) -> Tensor:  # -> [B, T] bool
        """True at positions whose logits predict an answer token (the next token's label)."""
        mask = torch.zeros_like(self.labels, dtype=torch.bool)
        mask[:, :-1] = self.labels[:, 1:] != IGNORE_INDEX
        return mask

    def text_only(self, image_token_id: int, pad_token_id: int) -> Batch:
        """The batch without image placeholders and without vision inputs."""
        keep = self.input_ids != image_token_id  # [B, T]
        rows = [(ids[k], lab[k]) for ids, lab, k in
                zip(self.input_ids, self.labels, keep & (self.attention_mask == 1))]
        return _pad([r[0] for r in rows], [r[1] for r in rows], pad_token_id)


def _pad(ids: Sequence[Tensor], labels: Sequence[Tensor], pad_token_id: int) -> Batch:
    """Right-pad 1-D rows into a ``Batch`` with no vision inputs."""
    length = max(len(r) for r in ids)
    out = torch.full((len(ids), length), pad_token_id, dtype=torch.long)
    lab = torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.long)
    for i, (row, row_labels) in enumerate(zip(ids, labels)):
        out[i, :len(row)], lab[i, :len(row)], mask[i, :len(row)] = row, row_labels, 1
    return Batch(out, mask, lab)


def user_turn(question: str, n_images: int = 1) -> list[dict[str, Any]]:
    """The one user message an adapter builds for a string prompt: images first, then text."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def render_prompt(processor: Any, messages: list[dict[str, Any]]) -> str:
    """The chat template over ``messages`` followed by the generation prompt."""
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@dataclass(frozen=True)
class Continuation:
    """An assistant turn as the chat template writes it after ``prompt``.

    text:   the answer through its end token, e.g. ``" There are two shapes.</s>"``
    used:   how many characters after ``prompt`` the template spends on ``text`` (without the
            appended EOS when the template writes none); the template's own text resumes there
    """

    prompt: str
    text: str
    used: int


def assistant_continuation(processor: Any, eos: str, history: list[dict[str, Any]],
                           answer: str) -> Continuation:
    """The assistant turn ``answer`` after the messages ``history``, cut after the EOS.

    A template that ends the turn without the EOS (llava-hf writes ``"ASSISTANT: answer "``)
    gets it appended to the stripped text: the target ends its answers by emitting it."""
    prompt = render_prompt(processor, history)
    turn = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
    full = processor.apply_chat_template(history + [turn], tokenize=False)
    rest = full[len(prompt):]
    if full.startswith(prompt) and eos in rest:
        used = rest.index(eos) + len(eos)
        return Continuation(prompt, rest[:used], used)
    if not full.startswith(prompt) or not answer.strip() or answer.strip() not in rest:
        raise ValueError(f"the chat template does not continue the generation prompt with "
                         f"the answer and {eos!r}: prompt {prompt!r}, full {full!r}")
    text = rest.rstrip()
    return Continuation(prompt, text + eos, len(text))


class ShapesCollator:
    """Turns shapes items into a ``Batch`` for one VLM processor (LLaVA or Qwen2-VL)."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        eos = self.tokenizer.eos_token
        if eos is None:
            raise ValueError("the processor's tokenizer has no EOS token to end answers with")
        self.eos = eos

    def prompt_text(self, question: str) -> str:
        return render_prompt(self.processor, user_turn(question))

    def answer_text(self, question: str, answer: str) -> str:
        """What the chat template writes after the generation prompt, cut after the EOS."""
        return assistant_continuation(self.processor, self.eos, user_turn(question),
                                      answer).text

    def __call__(self, items: Sequence[ShapesItem]) -> Batch:
        enc = self.processor(text=[self.prompt_text(it.question) for it in items],
                             images=[it.image for it in items], padding=True,
                             return_tensors="pt")
        prompt_lens = enc["attention_mask"].sum(1).tolist()
        if self.tokenizer.padding_side != "right":
            raise ValueError(f"expected right padding, the tokenizer pads "
                             f"{self.tokenizer.padding_side!r}")
        ids, labels = [], []
        for row, n, it in zip(enc["input_ids"], prompt_lens, items):
            answer = self.tokenizer(self.answer_text(it.question, it.answer),
                                    add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            ids.append(torch.cat([row[:n], answer]))
            labels.append(torch.cat([torch.full((n,), IGNORE_INDEX), answer]))
        batch = _pad(ids, labels, self.tokenizer.pad_token_id)
        batch.vision = {k: enc[k] for k in VISION_KEYS if k in enc}
        if "mm_token_type_ids" in enc:  # 0 = text everywhere past the prompt
            types = torch.zeros_like(batch.input_ids)  # [B, T]; T >= the padded prompt length
            width = enc["mm_token_type_ids"].shape[1]
            types[:, :width] = enc["mm_token_type_ids"] * enc["attention_mask"]
            batch.vision["mm_token_type_ids"] = types
        return batch

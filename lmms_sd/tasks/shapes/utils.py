"""lmms-eval hooks of the shapes tasks; the data, templates and scorer live in lmms_sd.data.shapes.

No ``doc_to_messages``: for chat models lmms-eval 0.7.3 builds the user turn itself from
``doc_to_visual`` and ``doc_to_text`` ([image, text]), which is all these tasks need.
"""
from __future__ import annotations

from typing import Any

import datasets
from PIL import Image

from lmms_sd.data.shapes import Content, score


def shapes_doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [doc["image"].convert("RGB")]


def shapes_doc_to_text(doc: dict[str, Any],
                       lmms_eval_specific_kwargs: dict[str, str] | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def shapes_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"content_acc": score(results[0], Content.from_json(doc["content"]))}


def shapes_caption_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    return dataset.filter(lambda topic: topic == "describe", input_columns="topic")


def shapes_qa_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    return dataset.filter(lambda topic: topic != "describe", input_columns="topic")

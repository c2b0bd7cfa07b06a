"""Long-answer tasks for speed measurement on real VLMs (need the Hugging Face hub).

Speculative decoding only pays off on long generations, so these tasks ask for detailed
answers. Their metric is the answer length in words: accuracy of open-ended descriptions needs
a judge model (lmms-eval's GPT-based llava_in_the_wild metric), while the speed numbers come
from the model class (``results["throughput"]``). Run the matching lmms-eval task for accuracy.
"""
from __future__ import annotations

from typing import Any

DETAIL_PROMPT = "Describe this image in detail."


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"].convert("RGB")]


def detail_doc_to_text(doc: dict[str, Any]) -> str:
    return DETAIL_PROMPT


def question_doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"answer_words": float(len(results[0].split()))}

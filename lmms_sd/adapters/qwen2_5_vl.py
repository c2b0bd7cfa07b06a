"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL's M-RoPE for images, a vision
tower with window attention and an MLP merger. For still images its ``get_rope_index`` gives
the same positions as Qwen2-VL's (the temporal spacing ``tokens_per_second`` applies to videos
only), so everything but the processor class is ``Qwen2VLAdapter``'s: positions are the
target's exact ones, ``t + rope_delta`` after the prompt (see ``qwen2_vl``).
"""
from __future__ import annotations

from typing import Any

from transformers import Qwen2_5_VLProcessor

from .qwen2_vl import Qwen2VLAdapter


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor, which needs torchvision."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None,
                 chat_template: str | None = None, **kwargs: Any):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    processor_class = Qwen2_5_VLImageOnlyProcessor

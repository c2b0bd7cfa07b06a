"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): vision tower with 2x2 patch merging + Qwen2
decoder with multimodal rotary positions (M-RoPE).

M-RoPE gives every token three position ids (time, height, width). Text tokens use their
1-D index on all three; image tokens use their grid coordinates, so after an image the largest
position id is smaller than the token count. ``get_rope_index`` at prefill returns that
difference as ``rope_delta``; every later token at 1-D text position ``t`` gets id
``t + rope_delta`` on all three sections. We compute it ourselves and never rely on the
model's stored ``rope_deltas`` (stale across requests and forwards).

``image_aspect_ratio="pad"`` (LLaVA's pad-to-square, asked for by a few lmms-eval tasks) changes
nothing here: Qwen2-VL's processor never crops, it resizes each image to a grid of whole patches
keeping its aspect ratio, which is what LLaVA pads for; padding would only add blank patches.
lmms-eval's own qwen2_vl class ignores the key as well.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

from ..core.interfaces import PromptInputs
from .base import HFAdapter, Messages

VISION_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the video processor, which needs torchvision."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None,
                 chat_template: str | None = None, **kwargs: Any):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2VLAdapter(HFAdapter):
    """Also the base of the later Qwen-VL families (``qwen2_5_vl``, ``qwen3_vl``): their
    processors, ``get_image_features`` and ``get_rope_index`` take the same arguments."""

    family = "qwen2_vl"
    processor_class: type = Qwen2VLImageOnlyProcessor  # what ``loading.load_processor`` builds

    def __init__(self, model: Qwen2VLForConditionalGeneration, processor: Any):
        super().__init__(model, processor, model.model.language_model)
        self.image_token_id: int = model.config.image_token_id
        self.rope_delta = 0

    def prepare(self, prompt: str | Messages, images: Sequence[Any] = (), *,
                chat: bool = True, image_aspect_ratio: str = "original") -> PromptInputs:
        if image_aspect_ratio not in ("original", "pad"):  # pad: see the module docstring
            raise ValueError(f"image_aspect_ratio={image_aspect_ratio!r}: {self.family} takes "
                             "'pad' (a no-op) or 'original'")
        text = self._format(prompt, len(images), chat)
        enc = self.processor(text=[text], images=list(images) or None, return_tensors="pt")
        ids = enc["input_ids"][0].to(self.device)  # [T]
        kwargs = {k: enc[k].to(self.device) for k in VISION_KEYS if k in enc and images}
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(self.dtype)
        return PromptInputs(ids, kwargs, ids == self.image_token_id)

    def _prefill_embeds(self, prompt: PromptInputs) -> Tensor:  # [T, H]
        embeds = self.embed_tokens(prompt.input_ids)
        kw = prompt.model_kwargs
        if kw.get("pixel_values") is None:
            return embeds
        feats = self._image_features(kw)
        return self._merge_image_features(prompt, embeds, torch.cat(list(feats.pooler_output)))

    def _image_features(self, kw: dict[str, Any]) -> Any:
        """The vision tower's output for the prompt's images (``pooler_output``: one tensor of
        merged features per image)."""
        return self.model.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"],
                                                   return_dict=True)

    def _prefill_position_ids(self, prompt: PromptInputs) -> Tensor:  # -> [3, 1, T]
        kw = prompt.model_kwargs
        if kw.get("image_grid_thw") is None:
            self.rope_delta = 0
            return super()._prefill_position_ids(prompt)
        if kw.get("mm_token_type_ids") is None:
            raise ValueError("a Qwen2-VL prompt with images needs mm_token_type_ids "
                             "(the processor returns them)")
        position_ids, delta = self.model.model.get_rope_index(
            prompt.input_ids[None], mm_token_type_ids=kw["mm_token_type_ids"],
            image_grid_thw=kw["image_grid_thw"])
        self.rope_delta = int(delta.reshape(-1)[0])
        return position_ids

    def _position_ids(self, positions: Tensor) -> Tensor:  # [Q] -> [3, 1, Q]
        return (positions + self.rope_delta).view(1, 1, -1).expand(3, 1, -1)

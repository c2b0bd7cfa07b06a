"""LLaVA (``LlavaForConditionalGeneration``): CLIP-style vision tower + projector + Llama.

The processor expands each ``<image>`` into one placeholder per image feature; at prefill the
projected features replace the placeholders' embeddings. After prefill LLaVA is a plain Llama
with 1-D positions.

``image_aspect_ratio="pad"`` is LLaVA-1.5's own preprocessing (``expand2square`` in the LLaVA
code, its checkpoints' ``image_aspect_ratio: pad``): each image is centred on a square of the
image processor's mean colour before the processor resizes and crops it, so nothing is cropped.
``original`` gives the image to the processor as is (llava-hf's default: resize, centre crop).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from ..core.interfaces import PromptInputs
from .base import HFAdapter, Messages


class LlavaAdapter(HFAdapter):
    family = "llava"

    def __init__(self, model: LlavaForConditionalGeneration, processor: Any):
        super().__init__(model, processor, model.model.language_model)
        self.image_token_id: int = model.config.image_token_id

    def prepare(self, prompt: str | Messages, images: Sequence[Any] = (), *,
                chat: bool = True, image_aspect_ratio: str = "original") -> PromptInputs:
        if image_aspect_ratio == "pad":
            fill = tuple(int(x * 255) for x in self.processor.image_processor.image_mean)
            images = [expand2square(image, fill) for image in images]
        elif image_aspect_ratio != "original":
            raise ValueError(f"image_aspect_ratio={image_aspect_ratio!r}: LLaVA takes 'pad' or "
                             "'original'")
        text = self._format(prompt, len(images), chat)
        enc = self.processor(text=[text], images=list(images) or None, return_tensors="pt")
        ids = enc["input_ids"][0].to(self.device)  # [T]
        kwargs = {}
        if "pixel_values" in enc:
            kwargs["pixel_values"] = enc["pixel_values"].to(self.device, self.dtype)
        return PromptInputs(ids, kwargs, ids == self.image_token_id)

    def _prefill_embeds(self, prompt: PromptInputs) -> Tensor:  # [T, H]
        embeds = self.embed_tokens(prompt.input_ids)
        pixels = prompt.model_kwargs.get("pixel_values")
        if pixels is None:
            return embeds
        feats = self.model.model.get_image_features(pixel_values=pixels, return_dict=True)
        return self._merge_image_features(prompt, embeds, torch.cat(list(feats.pooler_output)))


def expand2square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """``image`` centred on a square of colour ``fill`` whose side is its longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square

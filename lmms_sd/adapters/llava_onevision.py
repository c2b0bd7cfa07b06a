"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower + projector +
Qwen2 with 1-D positions, images in any-resolution tiles.

The processor picks, per image, the grid of tiles in ``image_grid_pinpoints`` that fits its
size best, and returns ``pixel_values`` # [n_images, 1 + tiles, C, h, w] (a resized base view
first) with ``image_sizes`` # [n_images, 2] (height, width). The model encodes every tile,
unpads the tile grid back to the image's aspect ratio, appends the learned ``image_newline``
after every row of features (``pack_image_features``), and may pool a grid larger than
``anyres_max_N`` tiles. The processor computes the same count, so the number of image tokens
depends on the image's size; every one of them (newlines included) is an ``<image>`` token whose
embedding the packed features replace. After prefill it is a plain Qwen2: 1-D positions.

``image_aspect_ratio="pad"`` (asked for by a few lmms-eval tasks) changes nothing here:
any-resolution tiling is OneVision's own answer to aspect ratios (its processor pads the tiles
and the model unpads the grid), and lmms-eval's own llava_onevision class takes the model
config's ``image_aspect_ratio`` instead of the task's.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

from ..core.interfaces import PromptInputs
from .base import HFAdapter, Messages

VISION_KEYS = ("pixel_values", "image_sizes", "batch_num_images")


class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without the video processor, which needs torchvision (its
    own settings are named here: ``save_pretrained`` writes only the ``__init__`` arguments)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None,
                 num_image_tokens: int | None = None,
                 vision_feature_select_strategy: str | None = None,
                 chat_template: str | None = None, image_token: str = "<image>",
                 vision_aspect_ratio: str = "anyres_max_9", **kwargs: Any):
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy,
                         chat_template=chat_template, image_token=image_token,
                         vision_aspect_ratio=vision_aspect_ratio, **kwargs)


class LlavaOnevisionAdapter(HFAdapter):
    family = "llava_onevision"
    processor_class = LlavaOnevisionImageOnlyProcessor

    def __init__(self, model: LlavaOnevisionForConditionalGeneration, processor: Any):
        super().__init__(model, processor, model.model.language_model)
        self.image_token_id: int = model.config.image_token_id

    def prepare(self, prompt: str | Messages, images: Sequence[Any] = (), *,
                chat: bool = True, image_aspect_ratio: str = "original") -> PromptInputs:
        if image_aspect_ratio not in ("original", "pad"):  # pad: see the module docstring
            raise ValueError(f"image_aspect_ratio={image_aspect_ratio!r}: LLaVA-OneVision takes "
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
        feats = self.model.model.get_image_features(
            kw["pixel_values"], kw["image_sizes"], batch_num_images=kw.get("batch_num_images"),
            return_dict=True)
        return self._merge_image_features(prompt, embeds, torch.cat(list(feats.pooler_output)))

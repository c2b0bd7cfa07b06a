"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): interleaved M-RoPE and DeepStack.

Positions: ``get_rope_index`` as Qwen2-VL's (three ids per token, ``t + rope_delta`` after the
prompt); the rotary embedding interleaves the (time, height, width) frequencies instead of
giving each a contiguous section, which the decoder's own ``rotary_emb`` does for us.

DeepStack: the vision tower also returns features of a few of its intermediate layers
(``vision_config.deepstack_visual_indexes``); the language model adds the i-th of them to its
hidden states at the image positions after decoder layer i. Only the prefill holds image
positions, so only the prefill gets them (``visual_pos_masks``, ``deepstack_visual_embeds``);
later steps are text. The features an MSD head reads (the last hidden state) therefore carry
DeepStack's contribution; its modality-decoupled image inputs are the merger's output e_p (the
embeddings placed at the image tokens), as for Qwen2-VL.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import Qwen3VLProcessor

from ..core.interfaces import PromptInputs
from .qwen2_vl import Qwen2VLAdapter


class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without the video processor, which needs torchvision."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None,
                 chat_template: str | None = None, **kwargs: Any):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    processor_class = Qwen3VLImageOnlyProcessor
    _deepstack: dict[str, Any] | None = None

    def _prefill_embeds(self, prompt: PromptInputs) -> Tensor:  # [T, H]
        self._deepstack = None
        embeds = self.embed_tokens(prompt.input_ids)
        kw = prompt.model_kwargs
        if kw.get("pixel_values") is None:
            return embeds
        feats = self._image_features(kw)
        merged = self._merge_image_features(prompt, embeds, torch.cat(list(feats.pooler_output)))
        # one [n_image_tokens, H] tensor per DeepStack layer, images in prompt order
        layers = [torch.cat(list(per_image)) for per_image in feats.deepstack_features]
        self._deepstack = {"visual_pos_masks": (prompt.input_ids == self.image_token_id)[None],
                           "deepstack_visual_embeds": layers}
        return merged

    def _prefill_decoder_kwargs(self) -> dict[str, Any]:
        extra, self._deepstack = self._deepstack or {}, None
        return extra

"""Any Hugging Face causal LM (Llama, Qwen2, SmolLM, ...), as a target or a text-only draft.

Under a VLM target it sees ``prompt.text_only_ids()``: the target's prompt with the image
placeholders removed (the tokenizers must agree; see ``loading.check_same_vocab``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor
from transformers import PreTrainedModel

from ..core.interfaces import PromptInputs, StepOutput
from .base import HFAdapter, Messages


class CausalLMAdapter(HFAdapter):
    family = "causal_lm"

    def __init__(self, model: PreTrainedModel, tokenizer: Any):
        super().__init__(model, tokenizer, model.get_decoder())

    def prepare(self, prompt: str | Messages, images: Sequence[Any] = (), *,
                chat: bool = True, image_aspect_ratio: str = "original") -> PromptInputs:
        if images:
            raise ValueError(f"a text-only model cannot take images (got {len(images)})")
        if chat and self.tokenizer.chat_template is None:
            raise ValueError("this tokenizer has no chat template: pass chat=False and raw text")
        text = self._format(prompt, 0, chat)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"][0]
        return PromptInputs(ids.to(self.device))

    def prefill(self, prompt: PromptInputs, *, hidden: bool = False,
                embeds: bool = False) -> StepOutput:
        return super().prefill(PromptInputs(prompt.text_only_ids()), hidden=hidden, embeds=embeds)

    def _prefill_embeds(self, prompt: PromptInputs) -> Tensor:  # [T, H]
        return self.embed_tokens(prompt.input_ids.to(self.device))

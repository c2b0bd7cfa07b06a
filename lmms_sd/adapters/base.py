"""What every Hugging Face adapter shares: the KV cache, the decoder call, masks, keep/crop.

A family adapter supplies three things:
  ``prepare``               text / chat messages + images -> ``PromptInputs``
  ``_prefill_embeds``       the decoder's input embeddings of a prompt (images merged in)
  ``_position_ids``         1-D text positions -> the decoder's position ids
and may supply ``_prefill_decoder_kwargs`` (extra decoder arguments of the prefill only, e.g.
Qwen3-VL's DeepStack features, which ``_prefill_embeds`` computed with the image features).

Every forward goes straight to the *decoder* (the language model inside a VLM) with
``inputs_embeds``; the lm_head is applied here. ``hidden`` is the decoder's last hidden state
after its final norm, i.e. the feature the lm_head reads (what EAGLE and MSD heads consume);
with ``hidden_layers`` set (an EAGLE-3 head's low / middle / high layers) it is instead the
INPUTS of those decoder layers, concatenated: # [Q, len(hidden_layers) * H].

Placement: ``device`` is the device of the input embeddings; under accelerate's ``device_map``
the layers (and their KV cache) may sit on other GPUs, and logits and features are returned on
``device``. Attention kernels that cannot take a 4-D tree mask (flash-attention,
``NO_TREE_MASK``) run prefill and chain steps; a tree-masked step switches the decoder to SDPA
for that one call (same KV cache layout).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel

from ..core.interfaces import PromptInputs, StepOutput
from ..core.kv import kv_crop, kv_keep, kv_length

Messages = list[dict[str, Any]]
NO_TREE_MASK = ("flash",)  # attention implementations (by substring) that ignore 4-D masks


class HFAdapter:
    """A Hugging Face causal (vision-)language model with its own ``DynamicCache``, batch 1."""

    family = "base"
    image_token_id: int | None = None  # VLM adapters: the placeholder their processor expands

    def __init__(self, model: PreTrainedModel, processor: Any, decoder: nn.Module):
        """processor: the model's processor (VLMs) or tokenizer (LMs); decoder: the module that
        maps ``inputs_embeds`` to the last hidden state using the cache."""
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.decoder = decoder
        self.lm_head: nn.Module = model.get_output_embeddings()
        self.embed_tokens: nn.Module = model.get_input_embeddings()
        self.vocab_size: int = self.lm_head.weight.shape[0]
        self.cache = DynamicCache(config=model.config)
        self.hidden_layers: tuple[int, ...] | None = None  # see the module docstring

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def seq_len(self) -> int:
        return kv_length(self.cache)

    @property
    def max_positions(self) -> int | None:
        """The most positions the decoder takes: ``max_position_embeddings`` of the text config
        (a VLM's language model), else of the config itself; None if neither sets it."""
        config = self.model.config
        for cfg in (config.get_text_config(), config):
            if getattr(cfg, "max_position_embeddings", None):
                return int(cfg.max_position_embeddings)
        return None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The generation config's EOS ids plus the tokenizer's, deduplicated in order."""
        ids = self.model.generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return tuple(dict.fromkeys(ids))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ family hooks
    def prepare(self, prompt: str | Messages, images: Sequence[Any] = (), *,
                chat: bool = True, image_aspect_ratio: str = "original") -> PromptInputs:
        """image_aspect_ratio: ``original`` (the processor as is) or ``pad`` (LLaVA's
        pad-to-square; what it means for each family is in its adapter's docstring)."""
        raise NotImplementedError

    def _prefill_embeds(self, prompt: PromptInputs) -> Tensor:  # -> [T, H]
        return self.embed_tokens(prompt.input_ids)

    def _merge_image_features(self, prompt: PromptInputs, embeds: Tensor, feats: Tensor) -> Tensor:
        """``embeds`` # [T, H] with the image-token rows replaced by ``feats`` # [n, H] in order."""
        slots = prompt.input_ids == self.image_token_id
        if int(slots.sum()) != len(feats):
            raise ValueError(f"the prompt has {int(slots.sum())} image tokens but the images "
                             f"give {len(feats)} features")
        embeds = embeds.clone()
        embeds[slots] = feats.to(embeds.dtype)
        return embeds

    def _prefill_position_ids(self, prompt: PromptInputs) -> Tensor:
        return self._position_ids(torch.arange(len(prompt.input_ids), device=self.device))

    def _prefill_decoder_kwargs(self) -> dict[str, Any]:
        """Extra decoder arguments of the prefill that ``_prefill_embeds`` just prepared."""
        return {}

    def _position_ids(self, positions: Tensor) -> Tensor:  # [Q] -> [1, Q]
        return positions[None]

    # ------------------------------------------------------------------ the protocol
    @torch.no_grad()
    def prefill(self, prompt: PromptInputs, *, hidden: bool = False,
                embeds: bool = False) -> StepOutput:
        self.cache = DynamicCache(config=self.model.config)
        inputs_embeds = self._prefill_embeds(prompt)  # [T, H]
        out = self._run(inputs_embeds, self._prefill_position_ids(prompt), None, hidden, False,
                        self._prefill_decoder_kwargs())
        if embeds:
            out.inputs_embeds = inputs_embeds
        return out

    @torch.no_grad()
    def forward(self, tokens: Tensor, positions: Tensor | None = None,
                mask: Tensor | None = None, *, hidden: bool = False,
                attentions: bool = False) -> StepOutput:
        """tokens: # [Q]; positions: # [Q] or None; mask: # [Q, seq_len + Q] bool or None."""
        q, past = len(tokens), self.seq_len
        if positions is None:
            positions = torch.arange(past, past + q, device=self.device)
        if positions.shape != tokens.shape:
            raise ValueError(f"positions {tuple(positions.shape)} must match tokens "
                             f"{tuple(tokens.shape)}")
        if mask is not None and tuple(mask.shape) != (q, past + q):
            raise ValueError(f"mask {tuple(mask.shape)} must be [Q, seq_len + Q] = "
                             f"[{q}, {past + q}]")
        embeds = self.embed_tokens(tokens.to(self.device))
        return self._run(embeds, self._position_ids(positions.to(self.device)),
                         None if mask is None else self._float_mask(mask), hidden, attentions)

    @torch.inference_mode()
    def hf_generate(self, prompt: PromptInputs, max_new_tokens: int, *,
                    assistant: "HFAdapter | None" = None, prompt_lookup: int = 0) -> list[int]:
        """Greedy ``transformers`` ``generate`` of this model, new tokens only, stopping at EOS:
        the reference speculative output must equal, and (with ``assistant``, HF assisted
        generation; with ``prompt_lookup`` > 0, HF prompt-lookup decoding of that many tokens)
        a speed peer. A causal LM gets the prompt without image tokens."""
        text_only = self.family == "causal_lm"
        ids = (prompt.text_only_ids() if text_only else prompt.input_ids)[None]  # [1, T]
        kwargs = {} if text_only else dict(prompt.model_kwargs)
        if assistant is not None:
            kwargs["assistant_model"] = assistant.model
        if prompt_lookup > 0:
            kwargs["prompt_lookup_num_tokens"] = prompt_lookup
            if self.image_token_id is not None:
                # HF's prompt lookup would propose the image placeholders that follow a match
                # in the prompt, and its first forward then miscounts image tokens; a suppressed
                # token is cut from its candidates (and a trained target never emits it)
                kwargs["suppress_tokens"] = [self.image_token_id]
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs,
                                  max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=list(self.eos_token_ids),
                                  pad_token_id=self.tokenizer.pad_token_id)
        return out[0, ids.shape[1]:].tolist()

    def keep(self, start: int, indices: Tensor) -> None:
        kv_keep(self.cache, start, indices)

    def crop(self, length: int) -> None:
        kv_crop(self.cache, length)

    # ------------------------------------------------------------------ internals
    def _float_mask(self, mask: Tensor) -> Tensor:  # [Q, S] bool -> [1, 1, Q, S] additive
        neg = torch.finfo(self.dtype).min
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(mask.to(self.device), zero, neg)[None, None]

    def _run(self, inputs_embeds: Tensor, position_ids: Tensor, mask: Tensor | None,
             hidden: bool, attentions: bool, extra: dict[str, Any] | None = None) -> StepOutput:
        """inputs_embeds: # [Q, H]; mask: # [1, 1, Q, S] additive float or None (causal);
        extra: further decoder arguments (prefill only)."""
        if attentions and self.decoder.config._attn_implementation != "eager":
            raise ValueError("attentions=True needs attn_implementation='eager', this model uses "
                             f"{self.decoder.config._attn_implementation!r}")
        aux = hidden and self.hidden_layers is not None
        with _tree_attention(self.decoder, mask is not None):
            out = self.decoder(inputs_embeds=inputs_embeds[None], position_ids=position_ids,
                               attention_mask=mask, past_key_values=self.cache, use_cache=True,
                               output_attentions=attentions, output_hidden_states=aux,
                               **(extra or {}))
        last = out.last_hidden_state[0]  # [Q, H]
        logits = self.lm_head(last).float().to(self.device)
        if aux:  # hidden_states[i] is the input of layer i (0: the embeddings)
            last = torch.cat([out.hidden_states[i][0].to(self.device)
                              for i in self.hidden_layers], dim=-1)
        last = last.to(self.device)
        return StepOutput(logits=logits, hidden=last if hidden else None,
                          attentions=out.attentions[-1][0].float().mean(0) if attentions else None)

    def _format(self, prompt: str | Messages, n_images: int, chat: bool) -> str:
        """The prompt text: raw when ``chat`` is False (placeholders included by the caller),
        else the chat template over ``prompt`` (a string becomes one user turn whose images
        come first)."""
        if not chat:
            if not isinstance(prompt, str):
                raise TypeError("chat=False takes the prompt as raw text, not messages")
            return prompt
        if isinstance(prompt, str):
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
            prompt = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(prompt, add_generation_prompt=True,
                                                  tokenize=False)


@contextmanager
def _tree_attention(decoder: nn.Module, masked: bool) -> Iterator[None]:
    """SDPA for one tree-masked call when the decoder's kernel cannot take 4-D masks."""
    impl = decoder.config._attn_implementation
    if not masked or not any(name in impl for name in NO_TREE_MASK):
        yield
        return
    decoder.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        decoder.set_attn_implementation(impl)


def extend_prompt(prompt: PromptInputs, tokens: Tensor) -> PromptInputs:
    """The prompt followed by text ``tokens`` # [n]: what a fresh prefill of an accepted
    sequence sees (per-token model kwargs such as ``mm_token_type_ids`` are extended with 0 =
    text)."""
    tokens = tokens.to(prompt.input_ids.device)
    kwargs = dict(prompt.model_kwargs)
    if "mm_token_type_ids" in kwargs:
        types = kwargs["mm_token_type_ids"]  # [1, T]
        kwargs["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, len(tokens))], dim=1)
    mask = None
    if prompt.image_mask is not None:
        mask = torch.cat([prompt.image_mask, prompt.image_mask.new_zeros(len(tokens))])
    return PromptInputs(torch.cat([prompt.input_ids, tokens]), kwargs, mask)

"""The MSD / EAGLE-2 draft head: one decoder layer of the target's architecture over fused inputs.

Glossary (target token positions p = 0, 1, ...; the target's own tensors)
-------------------------------------------------------------------------
x_p      the token at position p
e_p      the target's input embedding at p: ``embed_tokens(x_p)``, or at an image position the
         projected visual embedding that replaced the placeholder token
f_p      the target's feature at p: its last hidden state after the final norm, the input of
         ``lm_head``; ``lm_head(f_p)`` scores x_{p+1}
slot p   the head's sequence element for position p >= 1 (position 0 has no earlier feature)
u_p      the slot's input. Text position: ``fc([embed_tokens(x_p) ; f_{p-1}])`` (token embedding
         FIRST, feature second). Image position (MSD's modality decoupling): e_p itself, no fc
         and no feature.
g_p      the head's output at slot p: its estimate of f_p; ``lm_head(g_p)`` drafts x_{p+1}.
         While drafting, a draft token's slot uses its parent's g in place of the unknown f.

The head owns ``fc`` and ``layers``; ``embed_tokens`` and ``lm_head`` are the target's frozen
modules, held by reference outside the module tree (not in ``state_dict``, not moved by ``.to``).
For Llama (LLaVA-1.5) the first layer has no ``input_layernorm`` (EAGLE's layout: the fused input
goes straight into attention); Qwen layers keep theirs, as in MSD's released Qwen2-VL code.

Layer kinds (``LAYER_KINDS``, from the target's language model): ``llama`` (LLaVA-1.5),
``qwen2_vl``, ``qwen2_5_vl`` and ``qwen3_vl`` (M-RoPE; Qwen3-VL's QK-norm layer and interleaved
rotary), ``qwen2`` (LLaVA-OneVision's Qwen2, 1-D RoPE).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache, PretrainedConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRotaryEmbedding,
)
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2RotaryEmbedding,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLDecoderLayer,
    Qwen2_5_VLRotaryEmbedding,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VLDecoderLayer,
    Qwen2VLRotaryEmbedding,
)
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    Qwen3VLTextDecoderLayer,
    Qwen3VLTextRotaryEmbedding,
)

# how the head's rotary positions are counted (``msd.py``): the target's own (M-RoPE for
# Qwen2-VL) or 1-D ``arange`` in every section (MSD's released Qwen2-VL head)
POSITION_SCHEMES = ("target", "sequential")

# language-model ``model_type`` -> the head's layer kind
LAYER_KINDS = {"llama": "llama", "qwen2_vl": "qwen2_vl", "qwen2_vl_text": "qwen2_vl",
               "qwen2_5_vl_text": "qwen2_5_vl", "qwen3_vl_text": "qwen3_vl", "qwen2": "qwen2"}
# layer kind -> (decoder layer, rotary embedding) of that architecture
LAYERS = {"llama": (LlamaDecoderLayer, LlamaRotaryEmbedding),
          "qwen2_vl": (Qwen2VLDecoderLayer, Qwen2VLRotaryEmbedding),
          "qwen2_5_vl": (Qwen2_5_VLDecoderLayer, Qwen2_5_VLRotaryEmbedding),
          "qwen3_vl": (Qwen3VLTextDecoderLayer, Qwen3VLTextRotaryEmbedding),
          "qwen2": (Qwen2DecoderLayer, Qwen2RotaryEmbedding)}
MROPE_KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # three position ids per token


def layer_kind(config: PretrainedConfig) -> str:
    """The head's layer kind for a language-model config; an error for anything else."""
    kind = LAYER_KINDS.get(config.model_type)
    if kind is None:
        raise ValueError(f"no MSD head layer for a language model of type {config.model_type!r}; "
                         f"supported: {sorted(LAYER_KINDS)}")
    return kind


def _make_layer(config: PretrainedConfig, index: int) -> nn.Module:
    kind = layer_kind(config)
    layer = LAYERS[kind][0](config, index)
    if kind == "llama" and index == 0:  # EAGLE's Llama head: no norm between the fused input and attention
        layer.input_layernorm = nn.Identity()
    return layer


@dataclass(frozen=True)
class SharedTargetParts:
    """The target's frozen modules that the head reads but does not own."""

    embed_tokens: nn.Embedding
    lm_head: nn.Linear


class MSDHead(nn.Module):
    """fc + ``num_hidden_layers`` decoder layers (1 in EAGLE-2/MSD) + the target's rotary scheme.

    ``config`` is a language-model config of the target's class (LlamaConfig or
    Qwen2VLTextConfig) describing the head: hidden size, heads, MLP width, rope parameters.
    ``vocab_limit``: token ids >= it get -inf draft logits (a head trained on a 32000-token
    vocabulary under llava-hf's padded 32064-token one never proposes the padding ids).
    ``positions``: the scheme the head was trained with (``POSITION_SCHEMES``); the drafter
    uses it unless told otherwise, and ``save_msd_head`` records it.
    """

    def __init__(self, config: PretrainedConfig, embed_tokens: nn.Embedding, lm_head: nn.Linear,
                 *, fc_bias: bool = True, vocab_limit: int | None = None,
                 positions: str = "target"):
        super().__init__()
        if positions not in POSITION_SCHEMES:
            raise ValueError(f"positions must be one of {POSITION_SCHEMES}, got {positions!r}")
        self.positions = positions
        hidden = config.hidden_size
        if getattr(lm_head, "bias", None) is not None:
            raise ValueError("MSD heads assume a target lm_head without bias")
        for name, weight in (("embed_tokens", embed_tokens.weight), ("lm_head", lm_head.weight)):
            if weight.shape[-1] != hidden:
                raise ValueError(f"target {name} has width {weight.shape[-1]}, head hidden_size "
                                 f"is {hidden}")
        vocab = lm_head.weight.shape[0]
        if vocab_limit is not None and not 0 < vocab_limit <= vocab:
            raise ValueError(f"vocab_limit {vocab_limit} must be in [1, {vocab}]")
        config = copy.deepcopy(config)
        config._attn_implementation = "sdpa"  # takes our additive tree masks as is
        self.config = config
        self.kind = layer_kind(config)
        self.fc = nn.Linear(2 * hidden, hidden, bias=fc_bias)
        self.layers = nn.ModuleList(_make_layer(config, i) for i in range(config.num_hidden_layers))
        self.rotary = LAYERS[self.kind][1](config)  # non-persistent buffers only: nothing in the state dict
        self.target = SharedTargetParts(embed_tokens, lm_head)
        self.vocab_limit = vocab_limit if vocab_limit is not None and vocab_limit < vocab else None

    @property
    def vocab_size(self) -> int:
        return self.target.lm_head.weight.shape[0]

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def fuse(self, tokens: Tensor, features: Tensor, visual: Tensor | None = None,
             is_visual: Tensor | None = None) -> Tensor:
        """The slot inputs u (see the glossary).

        tokens:    # [B, Q] long, x_p
        features:  # [B, Q, H] f_{p-1} (target features, or the parent's g while drafting)
        visual:    # [B, Q, H] e_p, read only where ``is_visual``
        is_visual: # [B, Q] bool, True at image positions
        returns    # [B, Q, H]
        """
        table = self.target.embed_tokens.weight.detach()  # frozen, like the lm_head
        embeds = F.embedding(tokens, table).to(self.fc.weight.dtype)
        u = self.fc(torch.cat([embeds, features.to(self.fc.weight.dtype)], dim=-1))
        if is_visual is not None and bool(is_visual.any()):
            u = torch.where(is_visual[..., None], visual.to(u.dtype), u)
        return u

    def forward(self, inputs: Tensor, positions: Tensor, mask: Tensor,
                cache: DynamicCache | None = None, *,
                attentions: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Run the layers over Q new slots, appending them to ``cache`` if given.

        inputs:    # [B, Q, H] slot inputs u
        positions: # [B, Q] long, or [3, B, Q] for M-RoPE (temporal, height, width)
        mask:      # [B, Q, K] bool, True where slot i may attend key j; K = cached + Q
        returns    # [B, Q, H] g, the predicted target features; with ``attentions`` also
                   # [B, Q, K] the last layer's head-averaged attention (eager attention for
                   # this call: SDPA does not return its weights)
        """
        additive = torch.zeros(mask.shape, dtype=inputs.dtype, device=inputs.device)
        additive = additive.masked_fill(~mask, torch.finfo(inputs.dtype).min)[:, None]
        rope = self.rotary(inputs, positions)
        if not attentions:
            return self._layers(inputs, additive, rope, cache)
        seen: list[Tensor] = []
        hook = self.layers[-1].self_attn.register_forward_hook(
            lambda module, args, out: seen.append(out[1]))
        impl, self.config._attn_implementation = self.config._attn_implementation, "eager"
        try:
            hidden = self._layers(inputs, additive, rope, cache)
        finally:
            self.config._attn_implementation = impl
            hook.remove()
        return hidden, seen[0].mean(dim=1)  # [B, heads, Q, K] -> [B, Q, K]

    def _layers(self, hidden: Tensor, additive: Tensor, rope: tuple[Tensor, Tensor],
                cache: DynamicCache | None) -> Tensor:
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=additive, past_key_values=cache,
                           use_cache=cache is not None, position_embeddings=rope)
        return hidden

    def logits(self, features: Tensor) -> Tensor:  # [..., H] -> [..., V]
        weight = self.target.lm_head.weight.detach()  # frozen: no gradient reaches the target
        # under a device_map the lm_head may sit on another GPU than the head
        out = F.linear(features.to(weight.device, weight.dtype), weight).to(features.device)
        if self.vocab_limit is not None:
            out = out.clone()
            out[..., self.vocab_limit:] = float("-inf")
        return out

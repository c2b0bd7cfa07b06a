"""The EAGLE-3 draft head and its drafter (the MSD drafter's tree / KV machinery, other inputs).

Glossary (adds to ``msd_head``'s; target token positions p = 0, 1, ...)
-----------------------------------------------------------------------
a_p      the target's auxiliary states at p: the INPUTS of decoder layers ``aux_layers``
         (EAGLE-3's low / middle / high layers, default (2, L//2, L-3) of an L-layer target),
         concatenated: # [3H]. The adapter returns them as ``hidden`` when its ``hidden_layers``
         is set (``HFAdapter.hidden_layers``).
slot p   the head's sequence element for p >= 1; its input is the pair
         (embed_tokens(x_p), fc(a_{p-1})), stored side by side as u_p # [2H]. While drafting a
         node's feature is its parent's output g (# [H], no fc), as in EAGLE-3's ``cnets.py``.
g_p      the midlayer's output BEFORE the final norm (what EAGLE-3 feeds forward);
         ``lm_head(norm(g_p))`` scores x_{p+1} over the draft vocabulary.
midlayer attention over [input_layernorm(embed); hidden_norm(feature)] (width 2H, so q/k/v
         take 2H), residual = the feature, then the usual post-attention norm + MLP.
d2t, t2d the draft vocabulary: draft id i is target id ``i + d2t[i]``; ``t2d[j]`` says whether
         target id j is in it. Draft logits of ids outside it are -inf.

Modality decoupling (``Eagle3Config.decouple_images``, off by default as in EAGLE-3): at the
prompt's image positions both halves of u_p are the target's projected visual embedding e_p
(no token embedding, no feature), MSD's idea carried over. Off, an image slot reads the
placeholder token's embedding and the target's states like any other.

The head's rotary scheme is the target's (Llama: 1-D RoPE; Qwen2-VL: M-RoPE with the target's
positions, or ``sequential`` 1-D positions in all sections), exactly as for MSD heads.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache, LlamaConfig, PretrainedConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

from .msd import MSDDrafter, RopeIndex, qwen2_vl_rope_index
from .msd_head import POSITION_SCHEMES, SharedTargetParts, layer_kind

# the M-RoPE layer kinds an EAGLE-3 head has (Qwen3-VL's interleaved M-RoPE and QK-norm: not yet)
MROPE_HEADS = ("qwen2_vl", "qwen2_5_vl")


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low / middle / high target layers: (2, L//2, L-3)."""
    return 2, num_layers // 2, num_layers - 3


class Eagle3Layer(nn.Module):
    """EAGLE-3's ``midlayer``: a Llama decoder layer whose attention reads 2H."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = LlamaRMSNorm(hidden, eps=eps)
        self.hidden_norm = LlamaRMSNorm(hidden, eps=eps)
        self.self_attn = LlamaAttention(config, layer_idx=0)
        attn = self.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):  # 2H inputs: [embedding ; feature]
            old = getattr(attn, name)
            setattr(attn, name, nn.Linear(2 * hidden, old.out_features, bias=old.bias is not None))
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps=eps)
        self.mlp = LlamaMLP(config)

    def forward(self, embeds: Tensor, feature: Tensor, additive: Tensor,
                rope: tuple[Tensor, Tensor], cache: DynamicCache | None) -> Tensor:
        """embeds, feature: # [B, Q, H]; additive: # [B, 1, Q, K]; returns g # [B, Q, H]."""
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(feature)], dim=-1)
        attn, _ = self.self_attn(x, position_embeddings=rope, attention_mask=additive,
                                 cache=cache)
        h = feature + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Head(nn.Module):
    """fc (3H -> H, no bias) + midlayer + norm + lm_head over ``draft_vocab`` ids, with the
    target's frozen ``embed_tokens`` held by reference (not in the state dict).

    config:      a LlamaConfig describing the layer (hidden, heads, MLP, eps, rope).
    rotary_config: the target's language-model config when the head uses M-RoPE (Qwen2-VL).
    aux_layers:  the target layers whose inputs form a_p.
    d2t:         # [Vd] long offsets (draft id i -> target id i + d2t[i]); ``vocab_size``: V.
    """

    def __init__(self, config: LlamaConfig, embed_tokens: nn.Embedding, *,
                 aux_layers: tuple[int, ...], d2t: Tensor, vocab_size: int, kind: str = "llama",
                 rotary_config: PretrainedConfig | None = None, positions: str = "target"):
        super().__init__()
        if positions not in POSITION_SCHEMES:
            raise ValueError(f"positions must be one of {POSITION_SCHEMES}, got {positions!r}")
        hidden = config.hidden_size
        if embed_tokens.weight.shape[-1] != hidden:
            raise ValueError(f"target embed_tokens has width {embed_tokens.weight.shape[-1]}, "
                             f"head hidden_size is {hidden}")
        config = copy.deepcopy(config)
        config._attn_implementation = "sdpa"  # takes our additive tree masks as is
        self.config, self.kind, self.positions = config, kind, positions
        self.aux_layers = tuple(int(i) for i in aux_layers)
        self.fc = nn.Linear(len(self.aux_layers) * hidden, hidden, bias=False)
        self.midlayer = Eagle3Layer(config)
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, len(d2t), bias=False)
        draft_ids = torch.arange(len(d2t)) + d2t.long()
        if len(draft_ids) and (int(draft_ids.min()) < 0 or int(draft_ids.max()) >= vocab_size):
            raise ValueError(f"d2t maps draft ids outside the target vocabulary [0, {vocab_size})")
        t2d = torch.zeros(vocab_size, dtype=torch.bool)
        t2d[draft_ids] = True
        if int(t2d.sum()) != len(d2t):
            raise ValueError("d2t maps two draft ids to the same target id")
        self.register_buffer("d2t", d2t.long().clone())
        self.register_buffer("t2d", t2d)
        if kind in MROPE_HEADS:  # Qwen2.5-VL: the same M-RoPE as Qwen2-VL
            self.rotary = Qwen2VLRotaryEmbedding(rotary_config)
        else:
            self.rotary = LlamaRotaryEmbedding(config)
        self.target = SharedTargetParts(embed_tokens, None)  # type: ignore[arg-type]

    @property
    def vocab_size(self) -> int:
        return len(self.t2d)

    @property
    def draft_vocab_size(self) -> int:
        return len(self.d2t)

    @property
    def feature_width(self) -> int:  # what a target feature (a_p) must measure
        return self.fc.in_features

    def draft_to_target(self) -> Tensor:  # [Vd] target ids of the draft vocabulary
        return torch.arange(len(self.d2t), device=self.d2t.device) + self.d2t

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def fuse(self, tokens: Tensor, features: Tensor, visual: Tensor | None = None,
             is_visual: Tensor | None = None) -> Tensor:
        """Slot inputs u = [embedding ; feature] (see the glossary).

        tokens:    # [B, Q] long
        features:  # [B, Q, 3H] target states a_{p-1} (fc applied) or # [B, Q, H] a parent's g
        visual:    # [B, Q, H] e_p, read only where ``is_visual`` (modality decoupling)
        returns    # [B, Q, 2H]
        """
        dtype = self.fc.weight.dtype
        embeds = F.embedding(tokens, self.target.embed_tokens.weight.detach()).to(dtype)
        features = features.to(dtype)
        if features.shape[-1] == self.fc.in_features:
            features = self.fc(features)
        u = torch.cat([embeds, features], dim=-1)
        if is_visual is not None and bool(is_visual.any()):
            e = visual.to(dtype)
            u = torch.where(is_visual[..., None], torch.cat([e, e], dim=-1), u)
        return u

    def forward(self, inputs: Tensor, positions: Tensor, mask: Tensor,
                cache: DynamicCache | None = None, *, attentions: bool = False) -> Tensor:
        """inputs # [B, Q, 2H]; positions # [B, Q] or [3, B, Q]; mask # [B, Q, K] bool;
        returns g # [B, Q, H] (the drafter's cache machinery is MSD's)."""
        if attentions:
            raise ValueError("EAGLE-3 heads do not record attention (use an MSD head for the "
                             "calibrated tree)")
        additive = torch.zeros(mask.shape, dtype=inputs.dtype, device=inputs.device)
        additive = additive.masked_fill(~mask, torch.finfo(inputs.dtype).min)[:, None]
        embeds, feature = inputs.chunk(2, dim=-1)
        return self.midlayer(embeds, feature, additive, self.rotary(inputs, positions), cache)

    def draft_logits(self, g: Tensor) -> Tensor:  # [..., H] -> [..., Vd]
        return self.lm_head(self.norm(g))

    def logits(self, g: Tensor) -> Tensor:  # [..., H] -> [..., V], -inf outside the draft vocab
        small = self.draft_logits(g).float()
        out = small.new_full((*small.shape[:-1], self.vocab_size), float("-inf"))
        out[..., self.draft_to_target()] = small
        return out


@dataclass(frozen=True)
class Eagle3Config:
    """positions: ``target`` | ``sequential`` | None (the head's own); decouple_images: feed the
    target's visual embedding at image slots (MSD's modality decoupling; EAGLE-3 does not)."""

    positions: str | None = None
    decouple_images: bool = False
    name: str = "eagle3"

    def __post_init__(self) -> None:
        if self.positions is not None and self.positions not in POSITION_SCHEMES:
            raise ValueError(f"positions must be one of {POSITION_SCHEMES}, got {self.positions!r}")


class Eagle3Drafter(MSDDrafter):
    """The MSD drafter over an ``Eagle3Head``: the same committed-slot cache, tree masks and
    recomputation of accepted slots; only the slot inputs differ (``Eagle3Head.fuse``)."""

    def __init__(self, head: Eagle3Head, cfg: Eagle3Config = Eagle3Config(),
                 rope_index: RopeIndex | None = None):
        super().__init__(head, cfg, rope_index)  # type: ignore[arg-type]

    def _prompt_slots(self, ids: Tensor, feats: Tensor, embeds: Tensor,
                      image: Tensor) -> Tensor:
        if not self.cfg.decouple_images:
            return super()._prompt_slots(ids, feats, embeds, torch.zeros_like(image))
        return super()._prompt_slots(ids, feats, embeds, image)


def bind_target_states(adapter: object, head: Eagle3Head) -> None:
    """Make ``adapter`` (an ``HFAdapter``) return the head's auxiliary states as ``hidden``."""
    layers = adapter.model.config.get_text_config().num_hidden_layers  # type: ignore[attr-defined]
    if max(head.aux_layers) >= layers:
        raise ValueError(f"the head reads target layers {head.aux_layers}, the target has "
                         f"{layers}: it was trained for another target")
    adapter.hidden_layers = head.aux_layers  # type: ignore[attr-defined]


def load_eagle3_drafter(source: str, target: PreTrainedModel, *,
                        cfg: Eagle3Config = Eagle3Config(), check_embeddings: bool = True,
                        dtype: torch.dtype | None = None) -> Eagle3Drafter:
    """The head at ``source`` (folder or hub id, published EAGLE-3 layout) bound to ``target``."""
    from .eagle3_format import load_eagle3_head  # deferred: the format module builds on this one

    head = load_eagle3_head(source, target, check_embeddings=check_embeddings, dtype=dtype)
    is_qwen = layer_kind(target.config.get_text_config()) in MROPE_HEADS
    return Eagle3Drafter(head, cfg, qwen2_vl_rope_index(target) if is_qwen else None)

"""Reading and writing EAGLE-3 draft heads in the published layout (SafeAILab/EAGLE eagle3,
sgl-project/SpecForge, read by vLLM's ``llama_eagle3.py``).

Files: ``config.json`` + ``pytorch_model.bin`` or ``model.safetensors`` (tried in that order, as
for MSD heads; ``msd_format.read_checkpoint``). config.json is a Llama config with
``"architectures": ["LlamaForCausalLMEagle3"]``, ``num_hidden_layers`` 1, ``vocab_size`` (the
target's), ``draft_vocab_size`` (the lm_head's rows; absent: the full vocabulary) and optionally
``"eagle_config": {"eagle_aux_hidden_state_layer_ids": [low, mid, high]}``; without it the
layers are EAGLE-3's default (2, L//2, L-3) of the L-layer target. Positions
(``lmms_sd_positions``) as for MSD heads; absent: ``target``.

State dict (vLLM maps ``midlayer.`` to ``layers.0.``; we keep the published names):
  fc.weight [H, 3H] (no bias)          midlayer.input_layernorm.weight, midlayer.hidden_norm.weight
  midlayer.self_attn.{q,k,v}_proj.weight [*, 2H], o_proj.weight
  midlayer.post_attention_layernorm.weight, midlayer.mlp.{gate,up,down}_proj.weight
  norm.weight [H]                      lm_head.weight [draft_vocab_size, H]
  d2t [draft_vocab_size] long: draft id i is target id i + d2t[i]
  t2d [vocab_size] bool: target id j is in the draft vocabulary (optional: derived from d2t)
  embed_tokens.weight                  optional (EAGLE's loader takes the target's): checked
                                       against the target when present, never written.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import LlamaConfig, PretrainedConfig, PreTrainedModel

from .eagle3 import MROPE_HEADS, Eagle3Head, default_aux_layers
from .msd_format import (CONFIG_FILE, EMBED_KEY, POSITIONS_KEY, WEIGHT_FILES, MSDCheckpoint,
                         _check_embeddings, check_state_dict, read_checkpoint)
from .msd_head import POSITION_SCHEMES, layer_kind

ARCHITECTURE = "LlamaForCausalLMEagle3"
AUX_KEY = "eagle_aux_hidden_state_layer_ids"


def aux_layers(cfg: dict[str, Any], target_layers: int) -> tuple[int, ...]:
    """The checkpoint's target layers (config ``eagle_config``) or EAGLE-3's default."""
    ids = (cfg.get("eagle_config") or {}).get(AUX_KEY)
    return tuple(int(i) for i in ids) if ids else default_aux_layers(target_layers)


def layer_config(cfg: dict[str, Any], text: PretrainedConfig) -> LlamaConfig:
    """The midlayer's Llama config: the checkpoint's shape, the target's rope base."""
    heads = cfg.get("num_attention_heads", text.num_attention_heads)
    hidden = cfg["hidden_size"]
    theta = cfg.get("rope_theta") or (text.rope_parameters or {}).get("rope_theta", 10000.0)
    return LlamaConfig(
        hidden_size=hidden, intermediate_size=cfg.get("intermediate_size", text.intermediate_size),
        num_hidden_layers=1, num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", text.rms_norm_eps),
        hidden_act=cfg.get("hidden_act", text.hidden_act), vocab_size=text.vocab_size,
        max_position_embeddings=cfg.get("max_position_embeddings", text.max_position_embeddings),
        rope_parameters={"rope_type": "default", "rope_theta": float(theta)},
        attention_bias=bool(cfg.get("attention_bias", False)), mlp_bias=False)


def check_against_target(ckpt: MSDCheckpoint, text: PretrainedConfig) -> None:
    """Clear errors when a checkpoint cannot serve this target's language model."""
    cfg, src, state = ckpt.config, ckpt.source, ckpt.state_dict
    if not any(k.startswith("midlayer.") for k in state):
        raise ValueError(f"{src} is not an EAGLE-3 head (no midlayer.* tensors; an MSD / "
                         "EAGLE-2 head goes to the *_msd classes)")
    if cfg.get("hidden_size") != text.hidden_size:
        raise ValueError(f"{src} has hidden_size {cfg.get('hidden_size')}, the target has "
                         f"{text.hidden_size}")
    vocab = cfg.get("vocab_size", text.vocab_size)
    if vocab > text.vocab_size:
        raise ValueError(f"{src} has vocab_size {vocab}, larger than the target's "
                         f"{text.vocab_size}: they cannot share token ids")
    draft_vocab = cfg.get("draft_vocab_size") or vocab
    if not 0 < draft_vocab <= vocab:
        raise ValueError(f"{src} has draft_vocab_size {draft_vocab}, not in [1, {vocab}]")
    ids = aux_layers(cfg, text.num_hidden_layers)
    if len(ids) * text.hidden_size != tuple(state["fc.weight"].shape)[-1]:
        raise ValueError(f"{src}: fc.weight {tuple(state['fc.weight'].shape)} does not read "
                         f"{len(ids)} target layers {ids} of width {text.hidden_size}")
    if min(ids) < 0 or max(ids) >= text.num_hidden_layers:
        raise ValueError(f"{src} reads target layers {ids}, the target has "
                         f"{text.num_hidden_layers}: it was trained for another target")
    theta = cfg.get("rope_theta")
    target_theta = (text.rope_parameters or {}).get("rope_theta", theta)
    if theta is not None and float(theta) != float(target_theta):
        raise ValueError(f"{src} has rope_theta {theta}, the target {target_theta}")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg.get(
        "num_attention_heads", text.num_attention_heads)
    target_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if layer_kind(text) in MROPE_HEADS and head_dim != target_dim:
        raise ValueError(f"{src}: an M-RoPE head needs the target's head_dim {target_dim}, "
                         f"it has {head_dim}")


def _vocab_maps(ckpt: MSDCheckpoint, vocab: int) -> Tensor:
    """d2t # [Vd], checked against t2d when stored."""
    state, src = ckpt.state_dict, ckpt.source
    draft_vocab = ckpt.config.get("draft_vocab_size") or ckpt.config.get("vocab_size", vocab)
    d2t = state.get("d2t")
    if d2t is None:
        if draft_vocab != vocab:
            raise ValueError(f"{src}: a reduced draft vocabulary ({draft_vocab} of {vocab}) "
                             "needs d2t in the state dict")
        d2t = torch.zeros(vocab, dtype=torch.long)
    if d2t.shape != (draft_vocab,):
        raise ValueError(f"{src}: d2t has shape {tuple(d2t.shape)}, draft_vocab_size is "
                         f"{draft_vocab}")
    t2d = state.get("t2d")
    if t2d is not None:
        derived = torch.zeros(len(t2d), dtype=torch.bool)
        ids = torch.arange(len(d2t)) + d2t.long()
        if int(ids.max()) >= len(t2d):
            raise ValueError(f"{src}: d2t maps to ids beyond t2d's {len(t2d)}")
        derived[ids] = True
        if not torch.equal(derived, t2d.bool()):
            raise ValueError(f"{src}: t2d and d2t name different draft vocabularies")
    return d2t.long()


def build_head(ckpt: MSDCheckpoint, target: PreTrainedModel, *, check_embeddings: bool = True,
               dtype: torch.dtype | None = None) -> Eagle3Head:
    """An ``Eagle3Head`` on ``target``'s embed_tokens with the checkpoint's weights."""
    text = target.config.get_text_config()
    check_against_target(ckpt, text)
    embed = target.get_input_embeddings()
    vocab = target.get_output_embeddings().weight.shape[0]
    if EMBED_KEY in ckpt.state_dict and check_embeddings:
        _check_embeddings(ckpt, embed.weight.detach())
    positions = ckpt.config.get(POSITIONS_KEY, "target")
    if positions not in POSITION_SCHEMES:
        raise ValueError(f"{ckpt.source}: {POSITIONS_KEY} {positions!r} is not one of "
                         f"{POSITION_SCHEMES}")
    head = Eagle3Head(layer_config(ckpt.config, text), embed,
                      aux_layers=aux_layers(ckpt.config, text.num_hidden_layers),
                      d2t=_vocab_maps(ckpt, vocab), vocab_size=vocab, kind=layer_kind(text),
                      rotary_config=text, positions=positions)
    weights = {k: v for k, v in ckpt.state_dict.items()
               if k != EMBED_KEY and not k.endswith("rotary_emb.inv_freq")}
    weights.setdefault("d2t", head.d2t)
    if "t2d" in weights:  # a checkpoint vocabulary smaller than the target's: pad with False
        weights["t2d"] = torch.cat([weights["t2d"].bool(),
                                    torch.zeros(vocab - len(weights["t2d"]), dtype=torch.bool)])
    weights.setdefault("t2d", head.t2d)
    check_state_dict(ckpt, head.state_dict(), weights, "an EAGLE-3 head")
    head.load_state_dict(weights, strict=True)
    return head.to(device=embed.weight.device, dtype=dtype or embed.weight.dtype).eval()


def load_eagle3_head(source: str | Path, target: PreTrainedModel, *,
                     check_embeddings: bool = True, dtype: torch.dtype | None = None,
                     revision: str | None = None) -> Eagle3Head:
    """A head from a folder or hub id, bound to ``target`` (an HF LLaVA or Qwen2-VL model)."""
    return build_head(read_checkpoint(source, revision), target,
                      check_embeddings=check_embeddings, dtype=dtype)


def new_eagle3_head(target: PreTrainedModel, draft_ids: Tensor | None = None, *,
                    layers: tuple[int, ...] | None = None,
                    positions: str = "target") -> Eagle3Head:
    """A freshly initialised head shaped like one layer of ``target``'s language model.
    draft_ids # [Vd] ascending target ids of the draft vocabulary (None: all of them)."""
    text = target.config.get_text_config()
    vocab = target.get_output_embeddings().weight.shape[0]
    if draft_ids is None:
        draft_ids = torch.arange(vocab)
    draft_ids = torch.as_tensor(draft_ids, dtype=torch.long).sort().values
    shape = {k: getattr(text, k) for k in ("hidden_size", "intermediate_size",
             "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "hidden_act")}
    shape["head_dim"] = getattr(text, "head_dim", None)
    head = Eagle3Head(layer_config(shape, text), target.get_input_embeddings(),
                      aux_layers=layers or default_aux_layers(text.num_hidden_layers),
                      d2t=draft_ids - torch.arange(len(draft_ids)), vocab_size=vocab,
                      kind=layer_kind(text), rotary_config=text, positions=positions)
    return head.to(target.get_input_embeddings().weight.device)


def eagle3_config(head: Eagle3Head) -> dict[str, Any]:
    """config.json for ``head`` in the layout EAGLE-3, SpecForge and vLLM read."""
    c = head.config
    return {
        "architectures": [ARCHITECTURE], "model_type": "llama",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": 1, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "hidden_act": c.hidden_act, "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_parameters["rope_theta"], "tie_word_embeddings": False,
        "vocab_size": head.vocab_size, "draft_vocab_size": head.draft_vocab_size,
        "eagle_config": {AUX_KEY: list(head.aux_layers), "use_aux_hidden_state": True},
        "torch_dtype": str(head.fc.weight.dtype).removeprefix("torch."),
        POSITIONS_KEY: head.positions,
    }


def save_eagle3_head(head: Eagle3Head, folder: str | Path, *,
                     weights_file: str = "model.safetensors") -> Path:
    """Write ``config.json`` + ``weights_file`` in the published layout."""
    if weights_file not in WEIGHT_FILES:
        raise ValueError(f"weights_file must be one of {WEIGHT_FILES}, got {weights_file!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    (folder / CONFIG_FILE).write_text(json.dumps(eagle3_config(head), indent=2) + "\n")
    if weights_file.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, str(folder / weights_file))
    else:
        torch.save(state, folder / weights_file)
    return folder

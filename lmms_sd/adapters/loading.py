"""Load a saved model directory as an adapter, choosing the family from ``config.model_type``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration,
                          LlavaProcessor, Qwen2VLForConditionalGeneration)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .base import HFAdapter
from .causal_lm import CausalLMAdapter
from .llava import LlavaAdapter
from .qwen2_vl import Qwen2VLAdapter, Qwen2VLImageOnlyProcessor

VLM_FAMILIES = {
    "llava": (LlavaForConditionalGeneration, LlavaAdapter),
    "qwen2_vl": (Qwen2VLForConditionalGeneration, Qwen2VLAdapter),
}
ROLES = ("target", "draft")


def model_type(path: str | Path) -> str:
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no model at {str(path)!r}: {config} does not exist")
    return json.loads(config.read_text())["model_type"]


def load_processor(path: str | Path) -> Any:
    """The processor saved beside a model (LLaVA, or Qwen2-VL without its video processor);
    the tokenizer for any other model type."""
    kind = model_type(path)
    if kind == "llava":
        return LlavaProcessor.from_pretrained(path)
    if kind == "qwen2_vl":
        return Qwen2VLImageOnlyProcessor.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def load_adapter(path: str | Path, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, attn_implementation: str | None = None,
                 role: str = "target") -> HFAdapter:
    """A LLaVA / Qwen2-VL adapter, or a causal-LM adapter for any model type that
    ``AutoModelForCausalLM`` knows. ``role`` only documents intent ("target" or "draft")."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    kind = model_type(path)
    kwargs = {"dtype": dtype or torch.float32}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if kind in VLM_FAMILIES:
        model_cls, adapter_cls = VLM_FAMILIES[kind]
        model = model_cls.from_pretrained(path, **kwargs).to(device)
        return adapter_cls(model, load_processor(path))
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"unsupported model type {kind!r} at {str(path)!r}: expected one of "
                         f"{sorted(VLM_FAMILIES)} or a causal LM type of AutoModelForCausalLM")
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return CausalLMAdapter(model.to(device), AutoTokenizer.from_pretrained(path))


def check_same_vocab(target: HFAdapter, draft: HFAdapter) -> None:
    """Raise unless the draft's token ids mean the same tokens as the target's.

    The tokenizers must map every token to the same id, and the draft's logit rows must not
    outnumber the target's (a smaller draft head, e.g. 32000 against llava-hf's padded 32064,
    is padded with -inf by the drafter)."""
    t_vocab, d_vocab = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if t_vocab != d_vocab:
        diff = sorted(set(t_vocab.items()) ^ set(d_vocab.items()))[:5]
        raise ValueError(f"target and draft tokenizers differ ({len(t_vocab)} vs {len(d_vocab)} "
                         f"tokens; e.g. {diff})")
    if draft.vocab_size > target.vocab_size:
        raise ValueError(f"draft vocabulary ({draft.vocab_size}) is larger than the target's "
                         f"({target.vocab_size})")

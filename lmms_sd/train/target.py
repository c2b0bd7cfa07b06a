"""Train a shapes target VLM from scratch: cross-entropy on the answer tokens only.

The architecture comes from the tiny-model configs of ``lmms_sd.testing.tiny`` (LLaVA: CLIP
vision tower + projector + Llama; Qwen2-VL: its vision tower with patch merging + M-RoPE Qwen2),
sized by ``VLMShape``. Every step draws fresh training scenes (``loop.train_items``), so the
model never sees a test-split scene and the run is reproducible from the seed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import (LlavaForConditionalGeneration, PreTrainedModel,
                          PreTrainedTokenizerFast, Qwen2VLForConditionalGeneration)

from ..data.shapes import TOPICS
from ..testing.tiny import FAMILIES, llava_config, qwen2_vl_config
from .data import IGNORE_INDEX, Batch, ShapesCollator
from .loop import OptimConfig, run_training, train_items


@dataclass(frozen=True)
class VLMShape:
    """Architecture knobs of a shapes VLM (the language model's and the vision tower's)."""

    layers: int = 4
    width: int = 128
    heads: int = 4
    vision_layers: int = 2
    vision_width: int = 32
    init_std: float = 0.02

    def to_dict(self) -> dict:
        return asdict(self)


def build_vlm(family: str, tokenizer: PreTrainedTokenizerFast, shape: VLMShape,
              seed: int) -> PreTrainedModel:
    """A randomly initialised VLM of ``family`` (weights seeded by ``seed``)."""
    knobs = shape.to_dict()
    torch.manual_seed(seed)
    if family == "llava":
        return LlavaForConditionalGeneration(llava_config(tokenizer, **knobs))
    if family == "qwen2_vl":
        return Qwen2VLForConditionalGeneration(qwen2_vl_config(tokenizer, **knobs))
    raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def answer_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """logits: # [B, T, V]; labels: # [B, T] with IGNORE_INDEX off the answer. Next-token CE."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX)


def train_target(model: PreTrainedModel, processor: Any, cfg: OptimConfig,
                 checkpoint: Path | None = None, topics: Sequence[str] = TOPICS,
                 desc: str = "target") -> dict:
    """Train ``model`` in place on shapes answers of ``topics``; return the training record
    (``checkpoint``: see ``run_training``)."""
    collate = ShapesCollator(processor)

    def batch_at(step: int) -> Batch:
        return collate(train_items(step, cfg.batch_size, cfg.seed, topics))

    def loss_fn(batch: Batch) -> Tensor:
        return answer_cross_entropy(model(**batch.model_inputs()).logits, batch.labels)

    return run_training(model, loss_fn, batch_at, cfg, desc=desc, checkpoint=checkpoint)

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
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from ..data.shapes import TOPICS
from ..testing.tiny import FAMILIES, TINY_FAMILIES
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
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    model_cls, config = TINY_FAMILIES[family][:2]
    torch.manual_seed(seed)
    return model_cls(config(tokenizer, **shape.to_dict()))


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


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The language model's decoder layers of a LLaVA / Qwen2-VL model."""
    inner = getattr(model.model, "language_model", model.model)
    return inner.layers


def deepen(model: PreTrainedModel, layers: int, seed: int) -> tuple[PreTrainedModel, list[int]]:
    """A copy of ``model`` with ``layers`` decoder layers that computes exactly the same
    function: the trained layers keep their order, spread evenly (trained layer i at new index
    ``i * layers // n``), and every inserted layer starts as the identity of the residual
    stream (fresh random weights, but zero attention and MLP output projections, so its
    residual branches add exactly 0 until fine-tuning moves them).
    Returns the new model and the new indices of the trained layers."""
    n = model.config.text_config.num_hidden_layers
    if layers < n:
        raise ValueError(f"deepen grows a model: {layers} layers < its {n}")
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.text_config.num_hidden_layers = layers
    if getattr(config.text_config, "layer_types", None) is not None:
        config.text_config.layer_types = [config.text_config.layer_types[0]] * layers
    torch.manual_seed(seed)
    deep = model.__class__(config)
    placed = [i * layers // n for i in range(n)]
    old, new = decoder_layers(model), decoder_layers(deep)
    with torch.no_grad():
        in_layers = {id(p) for p in old.parameters()}
        deep_params = dict(deep.named_parameters())
        for name, p in model.named_parameters():  # everything outside the decoder layers
            if id(p) not in in_layers:
                deep_params[name].copy_(p)
        for i, j in enumerate(placed):
            new[j].load_state_dict(old[i].state_dict())
        for j, layer in enumerate(new):
            if j not in placed:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    return deep, placed

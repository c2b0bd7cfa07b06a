"""Distil a draft from a trained target: KL(target || draft) on the answer positions.

Teacher forcing: each batch costs one target forward (no grad, no generation) and one draft
forward. Two kinds of draft:

  draft VLM   the target's family with a smaller language model (``VLMShape``) and the same
              vision config and processor, so it accepts the target's inputs unchanged
  text-only   a plain LM (Llama under LLaVA, Qwen2 under Qwen2-VL) sharing the tokenizer; it
              sees the prompt with the image placeholders removed (``Batch.text_only``), as the
              ``ModelDrafter`` feeds it at inference

Initialisation from the target (``init_from_target``): a draft VLM copies the target's vision
encoder (same config); either draft copies the token embeddings and lm_head when its width
equals the target's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from ..testing.tiny import FAMILIES, TINY_FAMILIES
from .data import Batch, ShapesCollator
from .loop import OptimConfig, run_training, train_items

# family -> (text-only LM class, its config builder): Llama, Qwen2 or Qwen3
TEXT_LM = {family: spec[2:] for family, spec in TINY_FAMILIES.items()}


@dataclass(frozen=True)
class TextLMShape:
    layers: int = 1
    width: int = 64
    heads: int = 2
    init_std: float = 0.02

    def to_dict(self) -> dict:
        return asdict(self)


def build_text_lm(family: str, tokenizer: PreTrainedTokenizerFast, shape: TextLMShape,
                  seed: int) -> PreTrainedModel:
    """The text-only draft LM of ``family``'s language-model architecture."""
    if family not in TEXT_LM:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    cls, make_config = TEXT_LM[family]
    torch.manual_seed(seed)
    return cls(make_config(tokenizer, **shape.to_dict()))


def vision_encoder(model: PreTrainedModel) -> nn.Module:
    """The vision tower of a LLaVA (``vision_tower``) or Qwen2-VL (``visual``) model."""
    for name in ("vision_tower", "visual"):
        if hasattr(model.model, name):
            return getattr(model.model, name)
    raise ValueError(f"{type(model).__name__} has no vision_tower or visual module")


def _copy_matching(src: nn.Module, dst: nn.Module) -> int:
    """Copy every parameter of ``src`` into the ``dst`` parameter of the same name and shape;
    return how many were copied."""
    dst_params = dict(dst.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name in dst_params and dst_params[name].shape == p.shape:
                dst_params[name].copy_(p)
                copied += 1
    return copied


def init_from_target(draft: PreTrainedModel, target: PreTrainedModel, *,
                     vision: bool) -> dict[str, Any]:
    """Copy what fits from the target into the draft; return what was copied."""
    record: dict[str, Any] = {"vision_tensors_copied": 0, "embeddings_copied": False}
    if vision:
        record["vision_tensors_copied"] = _copy_matching(vision_encoder(target),
                                                         vision_encoder(draft))
    pairs = [(target.get_input_embeddings(), draft.get_input_embeddings()),
             (target.get_output_embeddings(), draft.get_output_embeddings())]
    if all(t.weight.shape == d.weight.shape for t, d in pairs):
        with torch.no_grad():
            for t, d in pairs:
                d.weight.copy_(t.weight)
        record["embeddings_copied"] = True
    return record


def kl_target_draft(target_logits: Tensor, draft_logits: Tensor) -> Tensor:
    """Mean over rows of KL(target || draft). target_logits, draft_logits: # [N, V]."""
    log_p = F.log_softmax(target_logits.float(), dim=-1)
    log_q = F.log_softmax(draft_logits.float(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def distill_draft(draft: PreTrainedModel, target: PreTrainedModel, processor: Any,
                  cfg: OptimConfig, *, text_only: bool, checkpoint: Path | None = None) -> dict:
    """Train ``draft`` in place to match ``target`` on shapes answers; return the record
    (``checkpoint``: see ``run_training``)."""
    collate = ShapesCollator(processor)
    tok = processor.tokenizer
    image_token_id = target.config.image_token_id
    target.eval()

    def batch_at(step: int) -> Batch:
        return collate(train_items(step, cfg.batch_size, cfg.seed))

    def loss_fn(batch: Batch) -> Tensor:
        with torch.no_grad():
            teacher = target(**batch.model_inputs()).logits[batch.answer_mask()]  # [N, V]
        student_batch = batch.text_only(image_token_id, tok.pad_token_id) if text_only else batch
        student = draft(**student_batch.model_inputs()).logits[student_batch.answer_mask()]
        if student.shape != teacher.shape:
            raise RuntimeError(f"draft and target answer logits differ in shape: "
                               f"{tuple(student.shape)} vs {tuple(teacher.shape)}")
        return kl_target_draft(teacher, student)

    return run_training(draft, loss_fn, batch_at, cfg,
                        desc="text_only" if text_only else "draft_vlm", checkpoint=checkpoint)

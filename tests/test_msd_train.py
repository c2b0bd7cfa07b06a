"""MSD head training: what the target pass captures, the text-only -> multimodal curriculum,
and a short run on the tiny targets that lowers the loss and drafts losslessly with some
acceptance (so accepted paths are exercised)."""
from __future__ import annotations

import pytest
import torch

from lmms_sd.data.shapes import make_items
from lmms_sd.drafters.msd_format import new_msd_head
from lmms_sd.train.data import ShapesCollator
from lmms_sd.train.loop import OptimConfig
from lmms_sd.train.msd import (
    MSDTrainConfig,
    head_loss,
    is_multimodal_step,
    measure_tau,
    multimodal_probability,
    target_pass,
    train_msd_head,
)


def test_target_pass_captures_the_language_model_inputs_and_normed_features(family: str,
                                                                            target) -> None:
    model = target.model
    batch = ShapesCollator(target.processor)(make_items(3, seed=1, split="train"))
    tp = target_pass(model, batch)
    with torch.no_grad():
        out = model(**batch.model_inputs(), output_hidden_states=True)
    assert torch.allclose(tp.features, out.hidden_states[-1], atol=1e-5)
    image = batch.input_ids == model.config.image_token_id  # [B, T]
    token_embeds = model.get_input_embeddings()(batch.input_ids)
    assert torch.equal(tp.embeds[~image], token_embeds[~image])
    assert not torch.allclose(tp.embeds[image], token_embeds[image])  # visual embeddings
    b, t = batch.input_ids.shape
    if family == "qwen2_vl":  # M-RoPE: the image grid breaks the 1-D count
        assert tp.positions.shape == (3, b, t)
        assert not torch.equal(tp.positions[1], torch.arange(t).expand(b, -1))
    else:
        assert torch.equal(tp.positions, torch.arange(t).expand(b, -1))


def test_head_loss_trains_only_the_head(target) -> None:
    model = target.model
    batch = ShapesCollator(target.processor)(make_items(2, seed=2, split="train"))
    head = new_msd_head(model)
    loss, parts = head_loss(head, batch, target_pass(model, batch), MSDTrainConfig(),
                            model.config.image_token_id)
    loss.backward()
    assert all(p.grad is not None for p in head.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert set(parts) == {"feature_loss", "token_loss", "top1"}


def test_short_training_lowers_the_loss_and_drafts_losslessly(family: str, target) -> None:
    # Qwen2-VL trains with the sequential (released MSD) positions here; the target positions
    # are exercised by the drafter tests and the end-to-end runs of test_msd_head.
    positions = "sequential" if family == "qwen2_vl" else "target"
    torch.manual_seed(0)
    head = new_msd_head(target.model)
    optim = OptimConfig(steps=16, batch_size=4, lr=3e-3, warmup_steps=2, log_every=4)
    record = train_msd_head(head, target.model, target.processor, optim,
                            MSDTrainConfig(positions=positions))
    losses = [h["loss"] for h in record["loss_history"]]
    assert losses[-1] < losses[0]
    prompts = [target.prepare(it.question, [it.image])
               for it in make_items(3, seed=5, split="test")]
    stats = measure_tau(target, head, prompts, "dynamic", max_new_tokens=24, positions=positions,
                        depth=4, top_k=3, total_tokens=10)  # raises unless lossless
    assert stats["accepted_per_step"] > 0  # accepted drafts, not only rejections


def test_curriculum_is_text_only_then_ramps_to_multimodal() -> None:
    steps = 101
    probs = [multimodal_probability(s, steps, 0.5) for s in range(steps)]
    assert probs[:50] == [0.0] * 50          # the first half: text-only only (MSD's epochs)
    assert probs == sorted(probs) and probs[-1] == 1.0
    assert probs[75] == pytest.approx(0.5)   # linear between the half and the end
    draws = [is_multimodal_step(s, steps, 0.5, seed=3) for s in range(steps)]
    assert not any(draws[:50]) and draws[-1]
    assert 5 < sum(draws[50:]) < 45          # drawn, not a threshold
    assert draws == [is_multimodal_step(s, steps, 0.5, seed=3) for s in range(steps)]
    with pytest.raises(ValueError, match="text_phase"):
        MSDTrainConfig(text_phase=1.0)


def test_text_only_batches_feed_the_head_without_images(target) -> None:
    model = target.model
    full = ShapesCollator(target.processor)(make_items(2, seed=4, split="train"))
    batch = full.text_only(model.config.image_token_id, target.processor.tokenizer.pad_token_id)
    assert not (batch.input_ids == model.config.image_token_id).any() and not batch.vision
    tp = target_pass(model, batch)
    assert tp.features.shape[:2] == batch.input_ids.shape
    token_embeds = model.get_input_embeddings()(batch.input_ids)
    assert torch.equal(tp.embeds, token_embeds)  # no visual embedding anywhere
    loss, parts = head_loss(new_msd_head(model), batch, tp, MSDTrainConfig(),
                            model.config.image_token_id)
    assert torch.isfinite(loss) and parts["token_loss"] > 0


def test_training_follows_the_curriculum(target) -> None:
    head = new_msd_head(target.model)
    optim = OptimConfig(steps=4, batch_size=2, lr=1e-3, warmup_steps=1, log_every=2)
    record = train_msd_head(head, target.model, target.processor, optim,
                            MSDTrainConfig(text_phase=0.5))
    kinds = record["curriculum"]
    assert kinds["text_only_batches"] >= 2 and kinds["multimodal_batches"] >= 1  # last is 1.0
    assert kinds["text_only_batches"] + kinds["multimodal_batches"] == 4
    record = train_msd_head(head, target.model, target.processor, optim,
                            MSDTrainConfig(curriculum=False))
    assert record["curriculum"] == {"text_only_batches": 0, "multimodal_batches": 4}

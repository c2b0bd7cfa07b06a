"""The shapes trainers' mechanics on small random models: batches say what inference sees,
teacher-forced training logits equal the adapters' logits, the schedule and the losses behave."""
from __future__ import annotations

import math

import pytest
import torch

from lmms_sd.adapters import LlavaAdapter, Qwen2VLAdapter, extend_prompt
from lmms_sd.data.shapes import corpus_texts, make_items
from lmms_sd.testing.tiny import llava_processor, qwen2_vl_processor, train_tokenizer
from lmms_sd.train.data import IGNORE_INDEX, ShapesCollator
from lmms_sd.train.distill import (TextLMShape, build_text_lm, init_from_target,
                                   kl_target_draft, vision_encoder)
from lmms_sd.train.loop import OptimConfig, is_vision_parameter, lr_factor, run_training
from lmms_sd.train.target import VLMShape, answer_cross_entropy, build_vlm

SMALL = VLMShape(layers=1, width=32, heads=2, vision_layers=1, vision_width=16, init_std=0.1)
ADAPTERS = {"llava": LlavaAdapter, "qwen2_vl": Qwen2VLAdapter}


@pytest.fixture(scope="module", params=("llava", "qwen2_vl"))
def setup(request: pytest.FixtureRequest) -> dict:
    family = request.param
    tok = train_tokenizer(corpus_texts(100), 320, family)
    processor = (llava_processor if family == "llava" else qwen2_vl_processor)(tok)
    model = build_vlm(family, tok, SMALL, seed=0).eval()
    items = make_items(3, seed=5, split="train")  # describe, count, colours: unequal lengths
    return {"family": family, "processor": processor, "model": model, "items": items,
            "adapter": ADAPTERS[family](model, processor),
            "batch": ShapesCollator(processor)(items)}


def test_rows_are_the_inference_prompt_then_the_answer_and_eos(setup: dict) -> None:
    batch, adapter, tok = setup["batch"], setup["adapter"], setup["processor"].tokenizer
    for i, it in enumerate(setup["items"]):
        prompt = adapter.prepare(it.question, [it.image]).input_ids
        n, length = len(prompt), int(batch.attention_mask[i].sum())
        assert torch.equal(batch.input_ids[i, :n], prompt)
        assert (batch.labels[i, :n] == IGNORE_INDEX).all()       # no loss on the prompt
        assert (batch.labels[i, length:] == IGNORE_INDEX).all()  # nor on padding
        answer = batch.labels[i, n:length]
        assert torch.equal(answer, batch.input_ids[i, n:length])
        assert int(answer[-1]) == tok.eos_token_id
        assert tok.decode(answer, skip_special_tokens=True).strip() == it.answer


def test_teacher_forced_logits_equal_the_adapter_prefill(setup: dict) -> None:
    """Training positions (padding, M-RoPE) are the ones decoding uses."""
    batch, adapter = setup["batch"], setup["adapter"]
    with torch.no_grad():
        logits = setup["model"](**batch.model_inputs()).logits  # [B, T, V]
    for i, it in enumerate(setup["items"]):
        prompt = adapter.prepare(it.question, [it.image])
        length = int(batch.attention_mask[i].sum())
        full = extend_prompt(prompt, batch.input_ids[i, len(prompt.input_ids):length])
        expected = adapter.prefill(full).logits  # [length, V]
        torch.testing.assert_close(logits[i, :length], expected, atol=1e-4, rtol=1e-4)


def test_text_only_batch_drops_exactly_the_image_tokens(setup: dict) -> None:
    batch, model, tok = setup["batch"], setup["model"], setup["processor"].tokenizer
    image_id = model.config.image_token_id
    text = batch.text_only(image_id, tok.pad_token_id)
    assert not (text.input_ids == image_id).any() and not text.vision
    for i in range(len(setup["items"])):
        real = batch.input_ids[i][batch.attention_mask[i] == 1]
        assert torch.equal(text.input_ids[i][text.attention_mask[i] == 1], real[real != image_id])
    # the tokens that the answer-mask positions predict: the same in both batches, in order
    assert torch.equal(batch.labels[batch.answer_mask().roll(1, dims=1)],
                       text.labels[text.answer_mask().roll(1, dims=1)])


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = OptimConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(cfg.steps)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] == pytest.approx(0.1)


def test_kl_is_zero_only_for_the_same_distribution() -> None:
    torch.manual_seed(0)
    p = torch.randn(5, 11)
    assert float(kl_target_draft(p, p + 3.0)) == pytest.approx(0.0, abs=1e-6)  # shift-invariant
    q = torch.randn(5, 11)
    expected = (p.softmax(-1) * (p.log_softmax(-1) - q.log_softmax(-1))).sum(-1).mean()
    assert float(kl_target_draft(p, q)) == pytest.approx(float(expected), rel=1e-5)
    assert float(expected) > 0


def test_init_from_target_copies_what_fits(setup: dict) -> None:
    family, target, tok = setup["family"], setup["model"], setup["processor"].tokenizer
    narrow = build_vlm(family, tok, VLMShape(**{**SMALL.to_dict(), "width": 16}), seed=1)
    record = init_from_target(narrow, target, vision=True)
    assert record["vision_tensors_copied"] > 0 and not record["embeddings_copied"]
    for name, p in vision_encoder(target).named_parameters():
        other = dict(vision_encoder(narrow).named_parameters())[name]
        if other.shape == p.shape:
            assert torch.equal(other, p), name
    lm = build_text_lm(family, tok, TextLMShape(layers=1, width=SMALL.width, heads=2), seed=2)
    assert init_from_target(lm, target, vision=False)["embeddings_copied"]
    assert torch.equal(lm.get_output_embeddings().weight, target.get_output_embeddings().weight)


def test_training_lowers_the_loss_on_a_fixed_batch(setup: dict) -> None:
    family, tok, batch = setup["family"], setup["processor"].tokenizer, setup["batch"]
    model = build_vlm(family, tok, SMALL, seed=3)
    cfg = OptimConfig(steps=8, batch_size=len(setup["items"]), lr=1e-2, warmup_steps=1,
                      log_every=1)

    def loss_fn(b):
        return answer_cross_entropy(model(**b.model_inputs()).logits, b.labels)

    record = run_training(model, loss_fn, lambda step: batch, cfg, desc="test")
    losses = [h["loss"] for h in record["loss_history"]]
    assert len(losses) == cfg.steps and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0], losses


def test_vision_lr_scale_zero_freezes_only_the_vision_parameters(setup: dict) -> None:
    family, tok, batch = setup["family"], setup["processor"].tokenizer, setup["batch"]
    model = build_vlm(family, tok, SMALL, seed=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = OptimConfig(steps=2, batch_size=len(setup["items"]), warmup_steps=0,
                      vision_lr_scale=0.0)
    run_training(model, lambda b: answer_cross_entropy(model(**b.model_inputs()).logits,
                                                       b.labels),
                 lambda step: batch, cfg, desc="test")
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    vision = {n for n in before if is_vision_parameter(n)}
    assert vision and not changed & vision
    assert model.get_input_embeddings().weight.requires_grad and changed - vision


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_weights(setup: dict,
                                                                      tmp_path) -> None:
    family, tok, batch = setup["family"], setup["processor"].tokenizer, setup["batch"]
    cfg = OptimConfig(steps=4, batch_size=len(setup["items"]), warmup_steps=1, log_every=1,
                      checkpoint_every=2)

    def train(ckpt, die_at: int | None = None):
        model = build_vlm(family, tok, SMALL, seed=5)

        def batch_at(step: int):
            if step == die_at:
                raise KeyboardInterrupt("killed")
            return batch

        record = run_training(model, lambda b: answer_cross_entropy(
            model(**b.model_inputs()).logits, b.labels), batch_at, cfg, "test", ckpt)
        return model, record

    straight, straight_record = train(None)
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        train(ckpt, die_at=3)
    assert ckpt.is_file()
    resumed, record = train(ckpt)
    assert [h["step"] for h in record["loss_history"]] == [1, 2, 3, 4]
    finished, again = train(ckpt)  # a complete checkpoint: nothing left to train
    assert again["loss_history"] == record["loss_history"]
    assert all(torch.equal(a, b) for a, b in zip(finished.parameters(), resumed.parameters()))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, msg=name)
    assert record["loss_history"][-1]["loss"] == pytest.approx(
        straight_record["loss_history"][-1]["loss"], rel=1e-5)


def test_checkpoint_period_must_align_with_logging_only_when_checkpointing(tmp_path) -> None:
    model = torch.nn.Linear(2, 1)
    cfg = OptimConfig(steps=3, batch_size=1, warmup_steps=0, log_every=2, checkpoint_every=3)

    def loss_fn(batch):
        return model(batch).pow(2).mean()

    record = run_training(model, loss_fn, lambda step: torch.ones(1, 2), cfg, desc="test")
    assert record["final_loss"] >= 0  # no checkpoint: any period is fine
    with pytest.raises(ValueError, match="multiple of log_every"):
        run_training(model, loss_fn, lambda step: torch.ones(1, 2), cfg, desc="test",
                     checkpoint=tmp_path / "ckpt.pt")


@pytest.mark.parametrize("family", ("llava", "qwen2_vl"))
def test_recipe_processor_keeps_black_at_zero(family: str) -> None:
    """Unit pixel scaling: the black background must not become a constant offset."""
    from PIL import Image

    from lmms_sd.train.shapes_models import Recipe, make_processor

    processor = make_processor(Recipe(family, tokenizer_items=50))
    black = Image.new("RGB", (32, 32), (0, 0, 0))
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    pixels = processor.image_processor(images=[black, white], return_tensors="pt")["pixel_values"]
    half = len(pixels) // 2  # LLaVA: [2, 3, H, W]; Qwen2-VL: flattened patches, black first
    assert pixels[:half].abs().max() == 0 and pixels[half:].min() == pytest.approx(1.0)


def test_deepen_computes_the_same_function_then_learns(setup: dict) -> None:
    """A deepened model's logits equal the shallow model's (inserted layers add exactly 0 to
    the residual stream), its trained layers sit where ``deepen`` says, and one optimiser step
    on the inserted layers changes its output (they are real layers, not dead weight)."""
    from lmms_sd.train.target import decoder_layers, deepen

    model, batch = setup["model"], setup["batch"]
    deep, placed = deepen(model, 7, seed=3)
    assert len(decoder_layers(deep)) == 7 and len(placed) == SMALL.layers
    assert placed == sorted(set(placed)) and placed[0] == 0
    for i, j in enumerate(placed):
        for (name, a), (_, b) in zip(decoder_layers(model)[i].state_dict().items(),
                                     decoder_layers(deep)[j].state_dict().items()):
            assert torch.equal(a, b), name
    deep.eval()
    with torch.no_grad():
        expected = model(**batch.model_inputs()).logits
        got = deep(**batch.model_inputs()).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    inserted = [p for j, layer in enumerate(decoder_layers(deep)) if j not in placed
                for p in layer.parameters()]
    opt = torch.optim.SGD(inserted, lr=1.0)
    answer_cross_entropy(deep(**batch.model_inputs()).logits, batch.labels).backward()
    opt.step()
    with torch.no_grad():
        moved = deep(**batch.model_inputs()).logits
    assert (moved - expected).abs().max() > 1e-3
    with pytest.raises(ValueError, match="grows a model"):
        deepen(model, SMALL.layers - 1, seed=0)

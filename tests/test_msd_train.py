"""MSD head training: what the target pass captures, the text-only -> multimodal curriculum,
a short run on the tiny targets that lowers the loss and drafts losslessly with some
acceptance (so accepted paths are exercised), and real ``accelerate launch`` runs on
conversation files: one CPU process, and two gloo processes that train on different data and
save the synchronised head."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_msd_data import write_data

from lmms_sd.core.generate import GenerationConfig, generate
from lmms_sd.data.shapes import make_items
from lmms_sd.drafters.msd import load_msd_drafter
from lmms_sd.drafters.msd_format import load_msd_head, new_msd_head
from lmms_sd.train.conversations import ConversationCollator, load_conversations
from lmms_sd.train.data import ShapesCollator
from lmms_sd.train.loop import OptimConfig
from lmms_sd.train.msd import (
    MSDTrainConfig,
    head_digest,
    head_loss,
    is_multimodal_step,
    measure_tau,
    multimodal_probability,
    target_pass,
    train_msd_head,
)
from lmms_sd.trees import make_builder

ROOT = Path(__file__).resolve().parents[1]


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
    assert head.positions == positions  # recorded for save_msd_head (lmms_sd_positions)
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


# ---------------------------------------------------------------------------- accelerate launch

def _free_port() -> int:
    with socket.socket() as s:  # other test runs share this machine: never the default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], processes: int = 1) -> dict:
    """``python -m accelerate.commands.launch ... -m lmms_sd.train.msd ARGS``; the record."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch",
                "--main_process_port", str(_free_port())]
    if processes == 1:
        launcher += ["--num_processes", "1", "--cpu"]
    else:  # `--cpu --num_processes 2` silently runs one process; this runs two gloo ones
        env["ACCELERATE_USE_CPU"] = "true"
        launcher += ["--config_file", str(ROOT / "launch/accelerate_cpu.yaml"),
                     "--num_processes", str(processes)]
    run = subprocess.run([*launcher, "-m", "lmms_sd.train.msd", *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    out = Path(args[args.index("--out") + 1])
    assert not (out / "state").exists()  # removed once the head is saved
    return json.loads((out / "train_record.json").read_text())


def eval_loss(head, target, batch) -> float:
    """MSD's loss of ``head`` on ``batch`` without noise."""
    with torch.no_grad():
        loss, _ = head_loss(head, batch, target_pass(target, batch), MSDTrainConfig(noise=0.0),
                            target.config.image_token_id)
    return float(loss)


def test_accelerate_launch_trains_on_conversation_files(tiny_paths, tiny_adapters,
                                                        tmp_path: Path) -> None:
    files = write_data(tmp_path)
    out = tmp_path / "head"
    record = launch(["--target", str(tiny_paths["llava"]["target"]), "--out", str(out),
                     "--mm-data", str(files["mm"]), "--image-folder", str(tmp_path / "images"),
                     "--text-data", str(files["text"]), "--steps", "12", "--batch-size", "2",
                     "--warmup-steps", "2", "--log-every", "4", "--save-every", "4",
                     "--grad-clip", "0.5", "--beta2", "0.95"])
    assert [h["step"] for h in record["loss_history"]] == [4, 8, 12]
    kinds = record["curriculum"]
    assert kinds["text_only_batches"] >= 6 and kinds["multimodal_batches"] >= 1
    assert record["optim"]["grad_clip"] == 0.5 and record["optim"]["betas"] == [0.9, 0.95]
    target = tiny_adapters["llava"]["target"]
    torch.manual_seed(0)  # the trainer's initial head (--seed 0)
    untrained, trained = new_msd_head(target.model), load_msd_head(out, target.model)
    collate = ConversationCollator(target.processor)
    for batch in (collate(load_conversations(files["mm"], tmp_path / "images")),
                  collate(load_conversations(files["text"]))):
        assert eval_loss(trained, target.model, batch) < eval_loss(untrained, target.model, batch)
    drafter = load_msd_drafter(str(out), target.model)
    cfg = GenerationConfig(max_new_tokens=16, eos_token_ids=target.eos_token_ids)
    for it in make_items(2, seed=3, split="test"):
        prompt = target.prepare(it.question, [it.image])
        plain = generate(target, prompt, cfg).tokens
        assert generate(target, prompt, cfg, drafter, make_builder("chain", k=4)).tokens == plain


def test_two_processes_train_on_different_data_and_save_the_synchronised_head(
        tiny_paths, tiny_adapters, tmp_path: Path) -> None:
    files = write_data(tmp_path)
    out = tmp_path / "head"
    record = launch(["--target", str(tiny_paths["qwen2_vl"]["target"]), "--out", str(out),
                     "--mm-data", str(files["mm"]), "--image-folder", str(tmp_path / "images"),
                     "--steps", "3", "--batch-size", "1", "--warmup-steps", "1",
                     "--log-every", "1"], processes=2)
    ranks = sorted(record["processes"], key=lambda p: p["rank"])
    assert [p["rank"] for p in ranks] == [0, 1]
    first = [set(p["first_conversations"]["multimodal"]) for p in ranks]
    assert first[0] and first[1] and not first[0] & first[1]  # different conversations
    assert ranks[0]["head_sha256"] == ranks[1]["head_sha256"]  # gradients were all-reduced
    target = tiny_adapters["qwen2_vl"]["target"].model
    saved = load_msd_head(out, target, dtype=torch.float32)
    assert head_digest(saved) == ranks[0]["head_sha256"]
    torch.manual_seed(0)
    assert head_digest(new_msd_head(target).float()) != ranks[0]["head_sha256"]  # it trained

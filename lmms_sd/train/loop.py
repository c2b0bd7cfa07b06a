"""The optimisation loop shared by every trainer: AdamW, linear warmup then cosine decay.

A trainer supplies a loss function of a ``Batch`` and a batch source indexed by step; the loop
owns the schedule, gradient clipping, the progress bar, the loss history and resumable
checkpoints (runs on a shared machine get killed).

Under ``accelerate launch`` (one CPU process, several GPU processes, DeepSpeed ZeRO-2) the
trainer passes an ``Accelerator``: the model, optimiser and schedule are prepared, the loss is the
prepared model's forward of the batch (DDP and DeepSpeed only see what goes through it), and
checkpoints are accelerate's ``save_state`` folders (DeepSpeed shards its optimiser state).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..data.shapes import TOPICS, ShapesItem, make_items
from .data import Batch


@dataclass(frozen=True)
class OptimConfig:
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1    # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.01   # on matrices only, not on norms and biases
    grad_clip: float = 1.0
    seed: int = 0                # model init and data stream
    log_every: int = 25          # steps per loss-history entry
    checkpoint_every: int = 25   # steps per resumable checkpoint (when checkpointing: a
                                 # multiple of log_every, so a resumed loss history aligns)
    vision_lr_scale: float = 1.0  # lr multiplier of the vision encoder and projector; 0 freezes
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's (MSD / EAGLE: 0.9, 0.95)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, "
                             f"{self.batch_size}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.vision_lr_scale < 0:
            raise ValueError(f"vision_lr_scale must be >= 0, got {self.vision_lr_scale}")

    def to_dict(self) -> dict:
        return asdict(self)


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step`` (0-based): warmup to 1, cosine to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps - 1)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train_items(step: int, batch_size: int, seed: int,
                topics: Sequence[str] = TOPICS) -> list[ShapesItem]:
    """The training items of one step: fresh scenes every step, reproducible from the seed."""
    return make_items(batch_size, seed=seed * 1_000_000 + step, split="train", topics=topics)


VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "model.visual.")


def is_vision_parameter(name: str) -> bool:
    """The vision encoder and projector of LLaVA / Qwen2-VL (the merger is inside ``visual``)."""
    return name.startswith(VISION_PREFIXES)


def _optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only and ``vision_lr_scale`` on vision parameters
    (frozen when it is 0)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        vision = is_vision_parameter(name)
        if vision and cfg.vision_lr_scale == 0:
            p.requires_grad_(False)
        if p.requires_grad:
            groups.setdefault((vision, p.dim() >= 2), []).append(p)
    return torch.optim.AdamW(
        [{"params": params, "lr": cfg.lr * (cfg.vision_lr_scale if vision else 1.0),
          "weight_decay": cfg.weight_decay if matrix else 0.0}
         for (vision, matrix), params in groups.items()], lr=cfg.lr, betas=cfg.betas)


def run_training(model: nn.Module, loss_fn: Callable[[Batch], Tensor] | None,
                 batch_at: Callable[[int], Batch], cfg: OptimConfig, desc: str,
                 checkpoint: Path | None = None, *, accelerator: Any = None) -> dict:
    """Train ``model`` in place for ``cfg.steps`` steps; return the loss history and timing.

    batch_at(step) -> the step's batch; loss_fn(batch) -> a scalar loss with a graph.
    checkpoint: a file written every ``cfg.checkpoint_every`` steps and at the end, and resumed
    from when it exists (the batches and the schedule depend on the step alone). The caller
    deletes it once the trained model is saved.
    accelerator: an ``accelerate.Accelerator`` (see ``run_accelerated``); ``loss_fn`` is then
    None and ``checkpoint`` a folder."""
    if accelerator is not None:
        if loss_fn is not None:
            raise ValueError("under an accelerator the loss is model(batch): pass loss_fn=None")
        return run_accelerated(model, batch_at, cfg, desc, accelerator, checkpoint)
    if loss_fn is None:
        raise ValueError("loss_fn is required without an accelerator")
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    state = {"step": 0, "history": [], "seconds": 0.0}
    if checkpoint is not None and cfg.checkpoint_every % cfg.log_every:
        raise ValueError(f"checkpoint_every ({cfg.checkpoint_every}) must be a multiple of "
                         f"log_every ({cfg.log_every}) when checkpointing")
    if checkpoint is not None and checkpoint.is_file():
        state = _load_checkpoint(checkpoint, model, opt, sched)
    model.train()
    history: list[dict] = state["history"]
    window: list[float] = []
    t0 = time.perf_counter() - state["seconds"]
    bar = tqdm(range(state["step"], cfg.steps), desc=desc, mininterval=10,
               initial=state["step"], total=cfg.steps)
    for step in bar:
        loss = loss_fn(batch_at(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        window.append(float(loss.detach()))
        if len(window) == cfg.log_every or step + 1 == cfg.steps:
            history.append({"step": step + 1, "loss": sum(window) / len(window)})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            window = []
            due = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps
            if checkpoint is not None and due:
                _save_checkpoint(checkpoint, model, opt, sched, {
                    "step": step + 1, "history": history,
                    "seconds": time.perf_counter() - t0})
    model.eval()
    return {"optim": cfg.to_dict(), "loss_history": history,
            "final_loss": history[-1]["loss"], "train_seconds": time.perf_counter() - t0}


def _save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(),
                "sched": sched.state_dict(), **state}, tmp)
    tmp.replace(path)  # atomic: a kill mid-write leaves the previous checkpoint


def _load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler) -> dict:
    saved = torch.load(path, weights_only=False)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    sched.load_state_dict(saved["sched"])
    return {k: saved[k] for k in ("step", "history", "seconds")}


# ---------------------------------------------------------------------------- accelerate

class LoopProgress:
    """The loop's own state, saved and restored with accelerate's checkpoints."""

    def __init__(self) -> None:
        self.step, self.history, self.seconds = 0, [], 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history, self.seconds = state["step"], state["history"], state["seconds"]


def _prepare(model: nn.Module, cfg: OptimConfig, accelerator: Any) -> tuple[Any, Any, Any]:
    """(model, optimiser, schedule) prepared by ``accelerator``. DeepSpeed gets the per-process
    batch size (accelerate cannot infer it without a dataloader) and the gradient clip, which it
    applies itself inside ``accelerator.backward``."""
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        plugin.deepspeed_config["gradient_clipping"] = cfg.grad_clip
    return accelerator.prepare(model, opt, sched)


def run_accelerated(model: nn.Module, batch_at: Callable[[int], Batch], cfg: OptimConfig,
                    desc: str, accelerator: Any, state_dir: Path | None = None) -> dict:
    """``run_training`` on every process of an ``accelerate launch``.

    model(batch) -> this process's scalar loss; batch_at(step) -> this process's batch (the
    caller shards the data by ``accelerator.process_index``). The schedule counts optimiser
    steps, so the Accelerator must be built with ``step_scheduler_with_optimizer=False``.
    state_dir: ``accelerator.save_state`` every ``cfg.checkpoint_every`` steps and at the end
    (all processes take part), resumed from when it exists. Only the main process shows a
    progress bar. The history holds the loss averaged over processes. ``model`` itself holds
    the trained weights afterwards (it is what the prepared wrapper unwraps to)."""
    if accelerator.step_scheduler_with_optimizer:
        raise ValueError("build the Accelerator with step_scheduler_with_optimizer=False: the "
                         "schedule counts optimiser steps, not samples")
    if state_dir is not None and cfg.checkpoint_every % cfg.log_every:
        raise ValueError(f"checkpoint_every ({cfg.checkpoint_every}) must be a multiple of "
                         f"log_every ({cfg.log_every}) when checkpointing")
    prepared, opt, sched = _prepare(model, cfg, accelerator)
    if accelerator.unwrap_model(prepared) is not model:
        raise RuntimeError("accelerate replaced the model object: the trained weights would "
                           "not be in the caller's model")
    progress = LoopProgress()
    accelerator.register_for_checkpointing(progress)
    if state_dir is not None and state_dir.is_dir():
        accelerator.load_state(str(state_dir))
    prepared.train()
    window: list[Tensor] = []
    t0 = time.perf_counter() - progress.seconds
    bar = tqdm(range(progress.step, cfg.steps), desc=desc, mininterval=10, initial=progress.step,
               total=cfg.steps, disable=not accelerator.is_main_process)
    for step in bar:
        loss = prepared(batch_at(step))
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(prepared.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        window.append(loss.detach().float())
        if len(window) == cfg.log_every or step + 1 == cfg.steps:
            mean = accelerator.reduce(torch.stack(window).mean(), reduction="mean")
            progress.history.append({"step": step + 1, "loss": float(mean)})
            bar.set_postfix(loss=f"{progress.history[-1]['loss']:.4f}")
            window = []
            if state_dir is not None and ((step + 1) % cfg.checkpoint_every == 0
                                          or step + 1 == cfg.steps):
                progress.step, progress.seconds = step + 1, time.perf_counter() - t0
                accelerator.save_state(str(state_dir))
    accelerator.wait_for_everyone()
    model.eval()
    history = progress.history
    return {"optim": cfg.to_dict(), "loss_history": history,
            "final_loss": history[-1]["loss"], "train_seconds": time.perf_counter() - t0,
            "processes": accelerator.num_processes}

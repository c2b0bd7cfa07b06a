"""Train an MSD head on a target VLM: teacher forcing on the target's own features.

Per batch: one no-grad target forward captures, from the language model inside the VLM, its
input embeddings e (images merged in), its position ids and its output features f (last hidden
state after the final norm). The head then runs over slots 1..T-1 (see ``drafters/msd_head``):
text slots get ``fc([embed(x_p) ; f_{p-1} + noise])``, image slots e_p. On the slots whose next
token is an answer token the loss is MSD's (EAGLE's):

  feature_weight * SmoothL1(g_p, f_p)
    + token_weight * CE(softmax(lm_head f_p), log_softmax(lm_head g_p))

MSD's recipe (main_deepspeed.py): weights 1.0 / 0.1, uniform noise 0.2 on the input features,
AdamW lr 5e-5, betas (0.9, 0.95), warmup 2000 steps, 40 epochs, gradient clip 0.5, and a
curriculum from text-only data (ShareGPT) to multimodal data (LLaVA mix665k): each sample is
multimodal with probability 0 during the first half of the epochs, then with a probability that
rises linearly to 1 by the last epoch. Here the data are shapes items: multimodal batches are the
items as the target sees them, text-only batches the same questions and answers with the image
placeholders removed (``Batch.text_only``); the curriculum draws one kind per batch with MSD's
schedule over steps (``multimodal_probability``). The optimiser is the shared loop's; the noise is
uniform in [-noise/2, noise/2] (EAGLE further scales it by 512 / sequence length).

    python -m lmms_sd.train.msd --target lmms_sd/assets/shapes/llava/target \
        --out lmms_sd/assets/shapes/llava/msd_head --steps 300
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from ..core.generate import GenerationConfig, generate
from ..drafters.msd import POSITION_SCHEMES, MSDConfig, MSDDrafter, qwen2_vl_rope_index
from ..drafters.msd_format import new_msd_head, save_msd_head
from ..drafters.msd_head import MSDHead
from ..trees import make_builder
from .data import Batch, ShapesCollator
from .loop import OptimConfig, run_training, train_items


@dataclass(frozen=True)
class MSDTrainConfig:
    feature_weight: float = 1.0   # MSD's v_w
    token_weight: float = 0.1     # MSD's p_w
    noise: float = 0.2            # width of the uniform noise on input features
    positions: str = "target"     # head positions: the target's (M-RoPE) or sequential
    curriculum: bool = True       # text-only batches first (MSD); False: multimodal only
    text_phase: float = 0.5       # fraction of steps on text-only batches only (MSD: half)

    def __post_init__(self) -> None:
        if self.positions not in POSITION_SCHEMES:
            raise ValueError(f"positions must be one of {POSITION_SCHEMES}, got {self.positions!r}")
        if min(self.feature_weight, self.token_weight, self.noise) < 0:
            raise ValueError(f"loss weights and noise must be >= 0, got {self}")
        if not 0 <= self.text_phase < 1:
            raise ValueError(f"text_phase must be in [0, 1), got {self.text_phase}")


def multimodal_probability(step: int, steps: int, text_phase: float) -> float:
    """MSD's curriculum: the chance that batch ``step`` (0-based, of ``steps``) is multimodal.

    0 while the progress ``step / (steps - 1)`` is below ``text_phase``, then rising linearly
    to 1 at the last step."""
    progress = step / max(steps - 1, 1)
    if progress < text_phase:
        return 0.0
    return min(1.0, (progress - text_phase) / (1 - text_phase))


def is_multimodal_step(step: int, steps: int, text_phase: float, seed: int) -> bool:
    """The curriculum's draw for batch ``step``, reproducible from ``seed``."""
    draw = random.Random(seed * 1_000_003 + step).random()
    return draw < multimodal_probability(step, steps, text_phase)


@dataclass
class TargetPass:
    """What the head learns from, captured inside the target's language model.

    features:  # [B, T, H] last hidden state after the final norm
    embeds:    # [B, T, H] input embeddings, projected visual embeddings at image tokens
    positions: # [B, T] or [3, B, T] (Qwen2-VL M-RoPE) position ids
    """

    features: Tensor
    embeds: Tensor
    positions: Tensor


@contextmanager
def _capture_language_model(target: PreTrainedModel) -> Iterator[dict[str, Tensor]]:
    seen: dict[str, Tensor] = {}

    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        seen.update(embeds=kwargs["inputs_embeds"], positions=kwargs.get("position_ids"),
                    features=output.last_hidden_state)

    handle = target.model.language_model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def target_pass(target: PreTrainedModel, batch: Batch) -> TargetPass:
    with _capture_language_model(target) as seen:
        target.model(**batch.model_inputs())
    positions = seen["positions"]
    if positions is None:  # LLaVA lets its Llama count 0..T-1
        b, t = batch.input_ids.shape
        positions = torch.arange(t, device=batch.input_ids.device).expand(b, -1)
    return TargetPass(seen["features"], seen["embeds"], positions)


def head_loss(head: MSDHead, batch: Batch, tp: TargetPass, cfg: MSDTrainConfig,
              image_token_id: int, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
    """MSD's loss on the answer slots of ``batch``; also returns detached parts and accuracy."""
    ids = batch.input_ids  # [B, T]
    prev = tp.features[:, :-1]  # f_{p-1} for slots p = 1..T-1
    noise = (torch.rand(prev.shape, generator=generator, device=prev.device) - 0.5) * cfg.noise
    u = head.fuse(ids[:, 1:], prev + noise.to(prev.dtype), tp.embeds[:, 1:],
                  ids[:, 1:] == image_token_id)
    t = u.shape[1]
    if cfg.positions == "target":
        positions = tp.positions[..., 1:]
    else:
        positions = torch.arange(1, t + 1, device=ids.device).expand(ids.shape[0], -1)
    causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril().expand(len(ids), -1, -1)
    g = head(u, positions, causal)  # [B, T-1, H]
    answer = batch.answer_mask()[:, 1:]  # slot p scores x_{p+1}
    pred, want = g[answer].float(), tp.features[:, 1:][answer].float()  # [N, H]
    feature_loss = F.smooth_l1_loss(pred, want)
    with torch.no_grad():
        target_logits = head.logits(want)
    draft_logits = head.logits(pred)
    token_loss = -(target_logits.softmax(-1) * draft_logits.float().log_softmax(-1)).sum(-1).mean()
    loss = cfg.feature_weight * feature_loss + cfg.token_weight * token_loss
    top1 = (draft_logits.argmax(-1) == target_logits.argmax(-1)).float().mean()
    return loss, {"feature_loss": float(feature_loss.detach()),
                  "token_loss": float(token_loss.detach()), "top1": float(top1)}


def train_msd_head(head: MSDHead, target: PreTrainedModel, processor: Any, optim: OptimConfig,
                   cfg: MSDTrainConfig = MSDTrainConfig()) -> dict:
    """Train ``head`` in place on shapes answers under ``target``, text-only batches first
    (``cfg.text_phase``); return the record."""
    collate = ShapesCollator(processor)
    image_token_id = target.config.image_token_id
    pad_token_id = processor.tokenizer.pad_token_id
    target.eval()
    device = target.get_output_embeddings().weight.device
    generator = torch.Generator(device).manual_seed(optim.seed)
    last: dict = {}
    kinds = {"text_only_batches": 0, "multimodal_batches": 0}

    def batch_at(step: int) -> Batch:
        batch = collate(train_items(step, optim.batch_size, optim.seed))
        if cfg.curriculum and not is_multimodal_step(step, optim.steps, cfg.text_phase,
                                                     optim.seed):
            batch = batch.text_only(image_token_id, pad_token_id)
            kinds["text_only_batches"] += 1
        else:
            kinds["multimodal_batches"] += 1
        return Batch(batch.input_ids.to(device), batch.attention_mask.to(device),
                     batch.labels.to(device), {k: v.to(device) for k, v in batch.vision.items()})

    def loss_fn(batch: Batch) -> Tensor:
        loss, parts = head_loss(head, batch, target_pass(target, batch), cfg, image_token_id,
                                generator)
        last.update(parts)
        return loss

    record = run_training(head, loss_fn, batch_at, optim, desc="msd_head")
    return {**record, "msd": asdict(cfg), "curriculum": kinds, "last_batch": dict(last)}


# ---------------------------------------------------------------------------- measuring

def measure_tau(target_adapter: Any, head: MSDHead, prompts: Sequence[Any], tree: str = "chain",
                max_new_tokens: int = 64, positions: str = "target", **tree_settings: Any) -> dict:
    """Greedy speculative decoding with the head on ``prompts`` (PromptInputs); raises if any
    output differs from the target's own greedy output.

    tau: emitted tokens per target decode step; acceptance_rate: accepted draft tokens per
    drafted depth (the chain acceptance rate for chains); both pooled over the prompts."""
    rope = qwen2_vl_rope_index(target_adapter.model) if head.kind == "qwen2_vl" else None
    drafter = MSDDrafter(head, MSDConfig(positions=positions), rope_index=rope)
    builder = make_builder(tree, **tree_settings)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens,
                           eos_token_ids=target_adapter.eos_token_ids)
    steps = emitted = accepted = drafted = 0
    for prompt in prompts:
        plain = generate(target_adapter, prompt, cfg).tokens
        res = generate(target_adapter, prompt, cfg, drafter, builder)
        if res.tokens != plain:
            raise AssertionError(f"MSD output differs from greedy: {res.tokens} vs {plain}")
        steps += res.stats.decode_steps
        emitted += sum(s.accepted + 1 for s in res.stats.steps)
        accepted += sum(s.accepted for s in res.stats.steps)
        drafted += res.stats.drafted
    return {"tree": tree, **tree_settings, "tau": emitted / max(steps, 1),
            "accepted_per_step": accepted / max(steps, 1),
            "acceptance_rate": accepted / max(drafted, 1), "n_prompts": len(prompts)}


def main(argv: Sequence[str] | None = None) -> None:
    from ..adapters.loading import load_adapter
    from .evaluate import eval_items

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="a saved target VLM (LLaVA or Qwen2-VL)")
    ap.add_argument("--out", required=True, help="folder for the head (EAGLE/MSD layout)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--positions", default="target", choices=POSITION_SCHEMES)
    ap.add_argument("--text-phase", type=float, default=MSDTrainConfig.text_phase,
                    help="curriculum: fraction of steps on text-only batches (MSD: 0.5)")
    ap.add_argument("--no-curriculum", action="store_true",
                    help="train on multimodal batches only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--eval-items", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    adapter = load_adapter(args.target)
    torch.manual_seed(args.seed)
    head = new_msd_head(adapter.model)
    optim = OptimConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        warmup_steps=min(30, args.steps - 1), seed=args.seed)
    record = train_msd_head(head, adapter.model, adapter.processor, optim,
                            MSDTrainConfig(positions=args.positions, text_phase=args.text_phase,
                                           curriculum=not args.no_curriculum))
    save_msd_head(head, args.out)
    items = eval_items(args.eval_items // 2, args.eval_items - args.eval_items // 2)
    prompts = [adapter.prepare(it.question, [it.image]) for it in items]
    record["eval"] = measure_tau(adapter, head, prompts, "chain", positions=args.positions, k=6)
    record["command"] = "python -m lmms_sd.train.msd " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    record["threads"] = torch.get_num_threads()
    (Path(args.out) / "train_record.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["eval"], indent=2))


if __name__ == "__main__":
    main()

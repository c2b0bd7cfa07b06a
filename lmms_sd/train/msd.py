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

Real data (``train/conversations.py``): ``--text-data`` ShareGPT / LLaVA JSON feeds the text-only
batches, ``--mm-data`` LLaVA JSON with ``--image-folder`` the multimodal ones (with only
``--mm-data``, text-only batches are its conversations with the images dropped, as
``Batch.text_only`` does). Under ``accelerate launch`` every process loads the frozen target on
its own device and trains on its own shard; the head is prepared (DDP or DeepSpeed ZeRO-2),
``OUT/state`` holds accelerate's resumable state, and the main process writes the head in the
published layout. ``launch/train_msd.sh`` has the 7B / 13B recipes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from ..core.generate import GenerationConfig, generate
from ..drafters.msd import POSITION_SCHEMES, MSDConfig, MSDDrafter, qwen2_vl_rope_index
from ..drafters.msd_format import load_msd_head, new_msd_head, save_msd_head
from ..drafters.msd_head import MROPE_KINDS, MSDHead
from ..trees import make_builder
from .conversations import ConversationCollator, ConversationStream, load_conversations
from .data import Batch, ShapesCollator
from .evaluate import eval_items, lossless_decoding
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
    if not bool(answer.any()):  # every answer truncated away: zero loss, zero gradients
        return g.sum() * 0.0, {"feature_loss": 0.0, "token_loss": 0.0, "top1": 0.0}
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


@dataclass(frozen=True)
class _FrozenTarget:
    """Held outside the module tree: accelerate must not prepare (wrap, shard) the target."""
    model: PreTrainedModel


class MSDLoss(nn.Module):
    """The head with its objective: ``forward(batch)`` runs the frozen target's pass and returns
    MSD's loss, so that under DDP / DeepSpeed the whole head step goes through the wrapper."""

    def __init__(self, head: MSDHead, target: PreTrainedModel, cfg: MSDTrainConfig,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.head, self.frozen = head, _FrozenTarget(target)
        self.cfg, self.generator = cfg, generator
        self.last: dict = {}

    def forward(self, batch: Batch) -> Tensor:
        target = self.frozen.model
        loss, parts = head_loss(self.head, batch, target_pass(target, batch), self.cfg,
                                target.config.image_token_id, self.generator)
        self.last.update(parts)
        return loss


@dataclass
class ConversationData:
    """Real-data batch sources of one process: either may be None (see ``batch_source``)."""
    collate: ConversationCollator
    text: ConversationStream | None = None
    multimodal: ConversationStream | None = None
    _drawn: dict = field(default_factory=lambda: {"step": 0, "text": 0, "multimodal": 0})

    def __post_init__(self) -> None:
        if self.text is None and self.multimodal is None:
            raise ValueError("ConversationData needs text or multimodal conversations")

    def index(self, step: int, kind: str, is_multimodal: Any) -> int:
        """How many ``kind`` batches the steps before ``step`` drew: the stream index of this
        step (counted on from the last call; from scratch when the steps go backwards)."""
        if self.text is None or self.multimodal is None:
            return step  # one stream serves every step
        drawn = self._drawn
        if step < drawn["step"]:
            drawn.update(step=0, text=0, multimodal=0)
        for s in range(drawn["step"], step):
            drawn["multimodal" if is_multimodal(s) else "text"] += 1
        drawn["step"] = step
        return drawn[kind]


def _to(batch: Batch, device: torch.device) -> Batch:
    return Batch(batch.input_ids.to(device), batch.attention_mask.to(device),
                 batch.labels.to(device), {k: v.to(device) for k, v in batch.vision.items()})


def batch_source(collate_shapes: ShapesCollator, data: ConversationData | None,
                 optim: OptimConfig, cfg: MSDTrainConfig, image_token_id: int, pad_token_id: int,
                 device: torch.device, kinds: dict[str, int], rank: int = 0,
                 world_size: int = 1) -> Callable[[int], Batch]:
    """batch_at(step): this process's batch of ``step``, text-only or multimodal as the
    curriculum draws (the same draw on every process). Shapes items when ``data`` is None
    (process r of n takes the stream's batch ``step * n + r``)."""
    def is_multimodal(step: int) -> bool:
        if data is not None and data.multimodal is None:
            return False  # text data only: there is no multimodal phase
        return not cfg.curriculum or is_multimodal_step(step, optim.steps, cfg.text_phase,
                                                        optim.seed)

    def batch_at(step: int) -> Batch:
        multimodal = is_multimodal(step)
        if data is None:
            batch = collate_shapes(train_items(step * world_size + rank, optim.batch_size,
                                               optim.seed))
        else:
            stream = data.multimodal if multimodal or data.text is None else data.text
            used = "multimodal" if stream is data.multimodal else "text"
            batch = data.collate(stream.batch(data.index(step, used, is_multimodal)))
        if not multimodal:
            batch = batch.text_only(image_token_id, pad_token_id)
        kinds[f"{'multimodal' if multimodal else 'text_only'}_batches"] += 1
        return _to(batch, device)

    return batch_at


def train_msd_head(head: MSDHead, target: PreTrainedModel, processor: Any, optim: OptimConfig,
                   cfg: MSDTrainConfig = MSDTrainConfig(), *,
                   data: ConversationData | None = None, accelerator: Any = None,
                   state_dir: Path | None = None) -> dict:
    """Train ``head`` in place under ``target``, text-only batches first (``cfg.text_phase``);
    return the record. Shapes answers without ``data``. With an ``accelerator`` (``accelerate
    launch``) the head is prepared and ``state_dir`` holds the resumable state; without one the
    shared loop runs as it always has. The head is trained under ``cfg.positions``, which it
    records (``MSDHead.positions``) for ``save_msd_head``."""
    head.positions = cfg.positions
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    target.eval()
    device = target.get_output_embeddings().weight.device
    generator = torch.Generator(device).manual_seed(optim.seed + rank)
    kinds = {"text_only_batches": 0, "multimodal_batches": 0}
    batch_at = batch_source(ShapesCollator(processor), data, optim, cfg,
                            target.config.image_token_id, processor.tokenizer.pad_token_id,
                            device, kinds, rank, world)
    objective = MSDLoss(head, target, cfg, generator)
    if accelerator is not None:
        record = run_training(objective, None, batch_at, optim, desc="msd_head",
                              checkpoint=state_dir, accelerator=accelerator)
    else:
        record = run_training(head, objective, batch_at, optim, desc="msd_head")
    return {**record, "msd": asdict(cfg), "curriculum": kinds,
            "last_batch": dict(objective.last)}


# ---------------------------------------------------------------------------- measuring

def measure_tau(target_adapter: Any, head: MSDHead, prompts: Sequence[Any], tree: str = "chain",
                max_new_tokens: int = 64, positions: str = "target", **tree_settings: Any) -> dict:
    """Greedy speculative decoding with the head on ``prompts`` (PromptInputs); raises if any
    output differs from the target's own greedy output.

    tau: emitted tokens per target decode step; acceptance_rate: accepted draft tokens per
    drafted depth (the chain acceptance rate for chains); both pooled over the prompts."""
    rope = qwen2_vl_rope_index(target_adapter.model) if head.kind in MROPE_KINDS else None
    drafter = MSDDrafter(head, MSDConfig(positions=positions), rope_index=rope)
    builder = make_builder(tree, **tree_settings)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens,
                           eos_token_ids=target_adapter.eos_token_ids)
    references = [generate(target_adapter, prompt, cfg).tokens for prompt in prompts]
    pooled = lossless_decoding(target_adapter, drafter, builder, prompts, references, cfg,
                               "MSD output")
    return {"tree": tree, **tree_settings, "tau": pooled.tau,
            "accepted_per_step": pooled.accepted / max(pooled.decode_steps, 1),
            "acceptance_rate": pooled.acceptance_rate, "n_prompts": len(prompts)}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _files(values: Sequence[str] | None) -> list[str]:
    """Repeatable, comma-separated file options -> one list."""
    return [f for v in values or () for f in v.split(",") if f]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="a saved target VLM (LLaVA or Qwen2-VL)")
    ap.add_argument("--out", required=True, help="folder for the head (EAGLE/MSD layout)")
    data = ap.add_argument_group("real data (default: the synthetic shapes task)")
    data.add_argument("--text-data", action="append", help="ShareGPT / LLaVA JSON for the "
                      "text-only batches (repeatable, or comma-separated)")
    data.add_argument("--mm-data", action="append", help="LLaVA JSON for the multimodal "
                      "batches (repeatable, or comma-separated)")
    data.add_argument("--image-folder", help="the folder the --mm-data image paths are under")
    data.add_argument("--max-length", type=int, default=2048, help="tokens per row (MSD: 2048)")
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimiser steps (default 300)")
    length.add_argument("--epochs", type=float, help="passes over the multimodal data (the "
                        "text data when there is none), per process")
    ap.add_argument("--batch-size", type=int, default=16, help="per process")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup-steps", type=int, help="default: min(30, steps - 1)")
    ap.add_argument("--grad-clip", type=float, default=OptimConfig.grad_clip)
    ap.add_argument("--weight-decay", type=float, default=OptimConfig.weight_decay)
    ap.add_argument("--beta2", type=float, default=OptimConfig.betas[1], help="AdamW beta2")
    ap.add_argument("--noise", type=float, default=MSDTrainConfig.noise,
                    help="width of the uniform noise on the input features")
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                    help="the frozen target's dtype (auto: bfloat16 on GPU, float32 on CPU); "
                         "the head trains in float32")
    ap.add_argument("--save-every", type=int, default=500, help="steps per resumable state "
                    "(under accelerate)")
    ap.add_argument("--log-every", type=int, default=25, help="steps per loss-history entry")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/state")
    ap.add_argument("--init", help="start from this head (a folder in the published layout) "
                    "instead of a fresh one, e.g. after the target was fine-tuned")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--positions", default="target", choices=POSITION_SCHEMES)
    ap.add_argument("--text-phase", type=float, default=MSDTrainConfig.text_phase,
                    help="curriculum: fraction of steps on text-only batches (MSD: 0.5)")
    ap.add_argument("--no-curriculum", action="store_true",
                    help="train on multimodal batches only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--eval-items", type=int, default=16, help="shapes items for the tau "
                    "check after training (shapes data only; 0: none)")
    return ap


def _conversation_data(args: argparse.Namespace, processor: Any, batch_size: int, rank: int,
                       world: int) -> ConversationData | None:
    text_files, mm_files = _files(args.text_data), _files(args.mm_data)
    if not text_files and not mm_files:
        if args.image_folder or args.epochs is not None:
            raise SystemExit("--image-folder and --epochs need --text-data or --mm-data")
        return None
    if mm_files and not args.image_folder:
        raise SystemExit("--mm-data needs --image-folder")

    def stream(convs: list) -> ConversationStream | None:
        return ConversationStream(convs, batch_size, args.seed, rank, world) if convs else None

    text = [c for f in text_files for c in load_conversations(f, drop_images=True)]
    mm = [c for f in mm_files for c in load_conversations(f, args.image_folder)]
    return ConversationData(ConversationCollator(processor, args.max_length), stream(text),
                            stream(mm))


def head_digest(head: MSDHead) -> str:
    """sha256 of the head's own weights (fc, layers) as float32."""
    digest = hashlib.sha256()
    for name, tensor in sorted(head.state_dict().items()):
        digest.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _process_summary(head: MSDHead, data: ConversationData | None, accelerator: Any) -> dict:
    """What one process trained: its rank, the first conversations of its epoch-0 shards and a
    digest of its head's weights (equal on every process when the gradients were synchronised)."""
    shards = {}
    for kind in ("text", "multimodal"):
        stream = getattr(data, kind, None) if data is not None else None
        if stream is not None:
            shards[kind] = [c.id for c in stream.shard(0)[:8]]
    return {"rank": accelerator.process_index, "head_sha256": head_digest(head),
            "first_conversations": shards}


def _start(args: argparse.Namespace) -> tuple[Any, Path, torch.dtype, Any]:
    """What a head trainer does first (this one and ``train.eagle3``): torch threads, the
    accelerator, the resumable state folder (``--resume`` must match whether it exists), the
    target's dtype (bf16 on GPU under ``auto``) and the frozen target on this process's device.
    Returns (accelerator, state_dir, dtype, target adapter)."""
    from accelerate import Accelerator

    from ..adapters.loading import load_adapter

    torch.set_num_threads(args.threads)
    accelerator = Accelerator(step_scheduler_with_optimizer=False)
    state_dir = Path(args.out) / "state"
    if args.resume != state_dir.is_dir():
        raise SystemExit(f"--resume needs {state_dir}" if args.resume else
                         f"{state_dir} exists: pass --resume to continue it, or remove it")
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if accelerator.device.type == "cuda"
                                       else torch.float32)
    return accelerator, state_dir, dtype, load_adapter(args.target, device=accelerator.device,
                                                       dtype=dtype)


def _optim_config(args: argparse.Namespace, data: Any) -> OptimConfig:
    """The optimiser settings of the command line; ``--epochs`` counts passes over the
    multimodal data (else the text data), default 300 steps."""
    if args.epochs is not None:
        per_epoch = (data.multimodal or data.text).batches_per_epoch
        steps = max(1, round(args.epochs * per_epoch))
    else:
        steps = args.steps if args.steps is not None else 300
    warmup = args.warmup_steps if args.warmup_steps is not None else min(30, steps - 1)
    return OptimConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=warmup,
                       grad_clip=args.grad_clip, weight_decay=args.weight_decay,
                       betas=(OptimConfig.betas[0], args.beta2), seed=args.seed,
                       log_every=args.log_every, checkpoint_every=args.save_every)


def main(argv: Sequence[str] | None = None) -> None:
    from accelerate.utils import gather_object

    args = _parser().parse_args(argv)
    accelerator, state_dir, dtype, adapter = _start(args)
    out, main_process = Path(args.out), accelerator.is_main_process
    torch.manual_seed(args.seed)
    if args.init:  # float32 weights beside a bf16 target
        head = load_msd_head(args.init, adapter.model, dtype=torch.float32).train()
    else:
        head = new_msd_head(adapter.model).float()
    data = _conversation_data(args, adapter.processor, args.batch_size,
                              accelerator.process_index, accelerator.num_processes)
    optim = _optim_config(args, data)
    cfg = MSDTrainConfig(noise=args.noise, positions=args.positions, text_phase=args.text_phase,
                         curriculum=not args.no_curriculum)
    record = train_msd_head(head, adapter.model, adapter.processor, optim, cfg, data=data,
                            accelerator=accelerator, state_dir=state_dir)
    record["processes"] = gather_object([_process_summary(head, data, accelerator)])
    if main_process:
        save_msd_head(head, out)  # ``head`` is what the prepared wrapper unwraps to
        if data is None and args.eval_items > 0:
            items = eval_items(args.eval_items // 2, args.eval_items - args.eval_items // 2)
            prompts = [adapter.prepare(it.question, [it.image]) for it in items]
            record["eval"] = measure_tau(adapter, head.to(dtype), prompts, "chain",
                                         positions=args.positions, k=6)
            print(json.dumps(record["eval"], indent=2))
        record["command"] = "python -m lmms_sd.train.msd " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        record["threads"] = torch.get_num_threads()
        record["data"] = {"text": _files(args.text_data), "multimodal": _files(args.mm_data),
                          "image_folder": args.image_folder, "max_length": args.max_length}
        (out / "train_record.json").write_text(json.dumps(record, indent=2) + "\n")
    accelerator.wait_for_everyone()
    if main_process and state_dir.is_dir():  # the head is saved: nothing left to resume
        shutil.rmtree(state_dir)
    accelerator.end_training()


if __name__ == "__main__":
    main()

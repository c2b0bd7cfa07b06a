"""Train an EAGLE-3 head on a target VLM with training-time test (TTT).

Per batch, one no-grad target forward captures, inside the language model, the input
embeddings, the position ids, the inputs of the head's layers ``aux_layers`` (a_p, see
``drafters/eagle3``) and the target's logits. Then ``ttt_steps`` = k unrolled steps
(EAGLE-3's training-time test; the published heads use k = 7):

  step 0   slot p: [embed(x_p) ; fc(a_{p-1})], causal over the slots   -> g0_p, scores x_{p+1}
  step j   slot p: [embed(x_{p+j}) ; g{j-1}_p] (its OWN previous output), attending to the step-0
           slots <= p, its own slots of steps 1..j-1 and itself, at position p + j: exactly what
           a chain draft node at depth j sees at inference               -> gj_p, scores x_{p+j+1}

The loss of step j is EAGLE-3's: CE(softmax(target logits over the draft vocabulary),
log_softmax(draft logits)) on the answer slots whose target argmax lies in the draft vocabulary,
weighted 0.8^j and summed over the steps. The draft vocabulary is the ``draft_vocab`` most
frequent answer tokens of the training data (``draft_vocabulary``: counted over the first
``vocab_batches`` batches the curriculum draws, ties by id), as SpecForge chooses it.

Data, curriculum (text-only batches first, MSD's schedule), accelerate / DeepSpeed loop and the
conversation formats are the MSD trainer's (``train/msd.py``; same options).

    python -m lmms_sd.train.eagle3 --target lmms_sd/assets/shapes/llava/target \
        --out lmms_sd/assets/shapes/llava/eagle3_head --steps 300 --ttt-steps 4
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel

from ..core.generate import GenerationConfig
from ..drafters.eagle3 import (MROPE_HEADS, Eagle3Config, Eagle3Drafter, Eagle3Head,
                               bind_target_states)
from ..drafters.eagle3_format import load_eagle3_head, new_eagle3_head, save_eagle3_head
from ..drafters.msd import qwen2_vl_rope_index
from ..trees import make_builder
from .data import Batch, ShapesCollator
from .evaluate import eval_items, lossless_decoding
from .loop import OptimConfig, run_training
from .msd import (MSDTrainConfig, _capture_language_model, _conversation_data, _files,
                  _FrozenTarget, _optim_config, _parser, _process_summary, _start,
                  batch_source)

STEP_DECAY = 0.8  # EAGLE-3's weight of TTT step j: 0.8 ** j


@dataclass(frozen=True)
class Eagle3TrainConfig:
    ttt_steps: int = 4            # k unrolled steps (EAGLE-3: 7)
    decouple_images: bool = False  # train with MSD's modality decoupling at image slots
    curriculum: bool = True       # text-only batches first (MSD); False: multimodal only
    text_phase: float = 0.5

    def __post_init__(self) -> None:
        if self.ttt_steps < 1:
            raise ValueError(f"ttt_steps must be >= 1, got {self.ttt_steps}")
        if not 0 <= self.text_phase < 1:
            raise ValueError(f"text_phase must be in [0, 1), got {self.text_phase}")

    def curriculum_config(self) -> MSDTrainConfig:
        return MSDTrainConfig(curriculum=self.curriculum, text_phase=self.text_phase)


@dataclass
class Eagle3Pass:
    """aux: # [B, T, 3H]; embeds: # [B, T, H]; positions: # [B, T] or [3, B, T];
    logits: # [B, T, V] the target's."""

    aux: Tensor
    embeds: Tensor
    positions: Tensor
    logits: Tensor


@torch.no_grad()
def target_pass(target: PreTrainedModel, batch: Batch, layers: Sequence[int]) -> Eagle3Pass:
    with _capture_language_model(target) as seen:
        out = target.model(**batch.model_inputs(), output_hidden_states=True)
    positions = seen["positions"]
    if positions is None:  # LLaVA lets its Llama count 0..T-1
        b, t = batch.input_ids.shape
        positions = torch.arange(t, device=batch.input_ids.device).expand(b, -1)
    hidden = out.hidden_states  # [i]: the input of layer i (0: the embeddings)
    aux = torch.cat([hidden[i] for i in layers], dim=-1)
    logits = target.get_output_embeddings()(seen["features"])
    return Eagle3Pass(aux, seen["embeds"], positions, logits)


def _ttt_mask(j: int, t: int, b: int, device: torch.device) -> Tensor:
    """# [B, t, (j + 1) * t] bool: step-j slot p sees step-0 slots <= p and slot p of steps
    1..j (itself included)."""
    eye = torch.eye(t, dtype=torch.bool, device=device)
    blocks = [torch.ones(t, t, dtype=torch.bool, device=device).tril()] + [eye] * j
    return torch.cat(blocks, dim=1).expand(b, -1, -1)


def _shift(x: Tensor, j: int, fill: float | int | bool) -> Tensor:
    """``x`` # [B, T, ...] moved j steps left along dim 1, the end filled with ``fill``."""
    if j == 0:
        return x
    pad = torch.full_like(x[:, :j], fill)
    return torch.cat([x[:, j:], pad], dim=1)


def ttt_outputs(head: Eagle3Head, ids: Tensor, tp: Eagle3Pass, steps: int,
                is_visual: Tensor | None = None) -> list[Tensor]:
    """The unrolled steps (module docstring): per step j, g # [B, T-1, H] of slots 1..T-1.
    ids: # [B, T]; is_visual: # [B, T-1] image slots (decoupling) or None."""
    b, t = ids.shape[0], ids.shape[1] - 1
    feature, cache, outputs = tp.aux[:, :-1], DynamicCache(config=head.config), []
    for j in range(steps):
        u = head.fuse(_shift(ids[:, 1:], j, 0), feature, tp.embeds[:, 1:], is_visual)
        g = head(u, tp.positions[..., 1:] + j, _ttt_mask(j, t, b, ids.device), cache)
        outputs.append(g)
        feature, is_visual = g, None  # later steps read the head's own output; no image slots
    return outputs


def ttt_loss(head: Eagle3Head, batch: Batch, tp: Eagle3Pass, cfg: Eagle3TrainConfig,
             image_token_id: int) -> tuple[Tensor, dict]:
    """EAGLE-3's training-time-test loss of ``batch``; also per-step top-1 agreement."""
    ids = batch.input_ids  # [B, T]
    visual = (ids[:, 1:] == image_token_id) if cfg.decouple_images else None
    target_logits = tp.logits[:, 1:].float()[..., head.draft_to_target()]  # [B, T-1, Vd]
    in_vocab = head.t2d[tp.logits[:, 1:].argmax(-1)]  # [B, T-1]
    answer = batch.answer_mask()[:, 1:] & in_vocab  # slot p scores x_{p+1}
    outputs = ttt_outputs(head, ids, tp, cfg.ttt_steps, visual)
    total, parts = outputs[-1].sum() * 0.0, {}  # zero with a graph when nothing is scored
    for j, g in enumerate(outputs):
        mask = _shift(answer, j, False)  # step j at slot p scores x_{p+j+1}
        if not bool(mask.any()):
            continue
        want = _shift(target_logits, j, 0.0)[mask].softmax(-1)
        draft = head.draft_logits(g[mask]).float()
        total = total + STEP_DECAY ** j * -(want * draft.log_softmax(-1)).sum(-1).mean()
        parts[f"top1_step{j}"] = float((draft.argmax(-1) == want.argmax(-1)).float().mean())
    return total, parts


class Eagle3Loss(nn.Module):
    """The head with its objective, so that under DDP / DeepSpeed the whole step goes through
    the wrapper (as ``train.msd.MSDLoss``)."""

    def __init__(self, head: Eagle3Head, target: PreTrainedModel, cfg: Eagle3TrainConfig):
        super().__init__()
        self.head, self.frozen, self.cfg = head, _FrozenTarget(target), cfg
        self.last: dict = {}

    def forward(self, batch: Batch) -> Tensor:
        target = self.frozen.model
        tp = target_pass(target, batch, self.head.aux_layers)
        loss, parts = ttt_loss(self.head, batch, tp, self.cfg, target.config.image_token_id)
        self.last.update(parts)
        return loss


def draft_vocabulary(batch_at: Callable[[int], Batch], batches: int, size: int,
                     vocab: int) -> Tensor:
    """# [size] ascending target ids: the ``size`` most frequent answer tokens of the first
    ``batches`` training batches (ties and unseen ids by ascending id)."""
    if not 0 < size <= vocab:
        raise ValueError(f"draft vocabulary size {size} must be in [1, {vocab}]")
    counts: Counter[int] = Counter()
    for step in range(batches):
        batch = batch_at(step)
        counts.update(batch.input_ids[:, 1:][batch.answer_mask()[:, :-1]].tolist())
    order = sorted(range(vocab), key=lambda i: (-counts.get(i, 0), i))
    return torch.tensor(sorted(order[:size]))


def train_eagle3_head(head: Eagle3Head, target: PreTrainedModel, batch_at: Callable[[int], Batch],
                      optim: OptimConfig, cfg: Eagle3TrainConfig, *, accelerator: Any = None,
                      state_dir: Path | None = None) -> dict:
    target.eval()
    objective = Eagle3Loss(head, target, cfg)
    if accelerator is not None:
        record = run_training(objective, None, batch_at, optim, desc="eagle3_head",
                              checkpoint=state_dir, accelerator=accelerator)
    else:
        record = run_training(head, objective, batch_at, optim, desc="eagle3_head")
    return {**record, "eagle3": asdict(cfg), "last_batch": dict(objective.last)}


def measure_tau(adapter: Any, head: Eagle3Head, prompts: Sequence[Any], tree: str = "chain",
                max_new_tokens: int = 64, decouple_images: bool = False,
                **tree_settings: Any) -> dict:
    """Greedy speculative decoding with the head; raises if any output differs from the
    target's own greedy output. ``adapter`` is bound to the head's states."""
    from ..core.generate import generate

    bind_target_states(adapter, head)
    rope = qwen2_vl_rope_index(adapter.model) if head.kind in MROPE_HEADS else None
    drafter = Eagle3Drafter(head, Eagle3Config(decouple_images=decouple_images), rope)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=adapter.eos_token_ids)
    references = [generate(adapter, p, cfg).tokens for p in prompts]
    pooled = lossless_decoding(adapter, drafter, make_builder(tree, **tree_settings), prompts,
                               references, cfg, "EAGLE-3 output")
    return {"tree": tree, **tree_settings, "tau": pooled.tau,
            "acceptance_rate": pooled.acceptance_rate, "n_prompts": len(prompts)}


def _eagle3_parser() -> argparse.ArgumentParser:
    ap = _parser()
    ap.description = __doc__.split("\n\n")[0]
    ap.add_argument("--ttt-steps", type=int, default=Eagle3TrainConfig.ttt_steps,
                    help="training-time-test steps k (EAGLE-3: 7)")
    ap.add_argument("--draft-vocab", type=int, help="draft vocabulary size (default: a quarter "
                    "of the target's, as EAGLE-3's 32k of Llama-3's 128k)")
    ap.add_argument("--vocab-batches", type=int, default=50,
                    help="training batches counted to choose the draft vocabulary")
    ap.add_argument("--decouple-images", action="store_true",
                    help="train with MSD's modality decoupling at image slots")
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    from accelerate.utils import gather_object

    args = _eagle3_parser().parse_args(argv)
    if args.noise != MSDTrainConfig.noise:
        raise SystemExit("--noise: EAGLE-3 trains without feature noise (training-time test)")
    accelerator, state_dir, dtype, adapter = _start(args)
    out, main_process = Path(args.out), accelerator.is_main_process
    model, rank, world = adapter.model, accelerator.process_index, accelerator.num_processes
    data = _conversation_data(args, adapter.processor, args.batch_size, rank, world)
    optim = _optim_config(args, data)
    cfg = Eagle3TrainConfig(args.ttt_steps, args.decouple_images, not args.no_curriculum,
                            args.text_phase)
    kinds = {"text_only_batches": 0, "multimodal_batches": 0}
    device = model.get_output_embeddings().weight.device
    batch_at = batch_source(ShapesCollator(adapter.processor), data, optim,
                            cfg.curriculum_config(), model.config.image_token_id,
                            adapter.processor.tokenizer.pad_token_id, device, kinds, rank, world)
    torch.manual_seed(args.seed)
    if args.init:
        head = load_eagle3_head(args.init, model, dtype=torch.float32).train()
        draft_ids = head.draft_to_target()
    else:
        size = args.draft_vocab or adapter.vocab_size // 4
        draft_ids = draft_vocabulary(batch_at, args.vocab_batches, size, adapter.vocab_size)
        head = new_eagle3_head(model, draft_ids, positions=args.positions).float()
    kinds.update(text_only_batches=0, multimodal_batches=0)  # count the training draws only
    record = train_eagle3_head(head, model, batch_at, optim, cfg, accelerator=accelerator,
                               state_dir=state_dir)
    record["curriculum"] = dict(kinds)
    record["draft_vocab"] = {"size": len(draft_ids), "counted_batches": args.vocab_batches}
    record["processes"] = gather_object([_process_summary(head, data, accelerator)])
    if main_process:
        save_eagle3_head(head, out)
        if data is None and args.eval_items > 0:
            items = eval_items(args.eval_items // 2, args.eval_items - args.eval_items // 2)
            prompts = [adapter.prepare(it.question, [it.image]) for it in items]
            record["eval"] = measure_tau(adapter, head.to(dtype).eval(), prompts, "chain", k=6,
                                         decouple_images=args.decouple_images)
            print(json.dumps(record["eval"], indent=2))
        record["command"] = "python -m lmms_sd.train.eagle3 " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        record["threads"] = torch.get_num_threads()
        record["data"] = {"text": _files(args.text_data), "multimodal": _files(args.mm_data),
                          "image_folder": args.image_folder, "max_length": args.max_length}
        (out / "train_record.json").write_text(json.dumps(record, indent=2) + "\n")
    accelerator.wait_for_everyone()
    if main_process and state_dir.is_dir():
        shutil.rmtree(state_dir)
    accelerator.end_training()


if __name__ == "__main__":
    main()

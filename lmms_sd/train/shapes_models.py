"""The whole recipe of the shipped shapes models: tokenizer -> target -> drafts -> eval.

    python -m lmms_sd.train.shapes_models --family llava --out lmms_sd/assets/shapes/llava \
        --cards model_cards

writes under ``--out``::

    target/ draft_vlm/ text_only/   save_pretrained weights (safetensors) + processor/tokenizer
    metrics.json                    recipe, parameter counts, training records, measured figures

The target trains in two stages: the colours questions alone (``Recipe.colour_stage``), then
every topic (``Recipe.target_optim``); the drafts are distilled from it.
``metrics.json`` keeps one entry per role under ``models``; a later trainer (e.g. an MSD head)
adds its own role with ``update_metrics`` without touching the others. ``--stages`` retrains
only some roles (the others are loaded from ``--out``); every present role is re-evaluated.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import transformers
from transformers import PreTrainedModel

from ..adapters.loading import load_adapter, load_processor
from ..data.shapes import corpus_texts
from ..testing.tiny import FAMILIES, make_processor as tiny_processor, train_tokenizer
from .cards import write_model_cards
from .distill import TextLMShape, build_text_lm, distill_draft, init_from_target
from .evaluate import (content_accuracy, eval_items, greedy_outputs, model_accuracy,
                       speculative)
from .loop import OptimConfig
from .target import VLMShape, build_vlm, count_parameters, decoder_layers, deepen, train_target

ROLES = ("target", "draft_vlm", "text_only")
STAGES = ("target", "deepen", "draft_vlm", "text_only")
METRICS = "metrics.json"


@dataclass(frozen=True)
class Recipe:
    family: str
    vocab_size: int = 512                         # the shapes corpus saturates at 478 tokens
    tokenizer_items: int = 2000                   # training items whose texts train the BPE
    target: VLMShape = VLMShape()
    draft_vlm: VLMShape = VLMShape(layers=1, width=64, heads=2)
    text_only: TextLMShape = TextLMShape()
    # Stage 1 (like LLaVA's feature-alignment stage): the colours questions alone. Trained on
    # every topic from the start, the target learned counts and positions but kept colours at
    # chance (LLaVA colours topic 0.19 after 1000 steps, 0.25 after 300 at full vision lr);
    # colours-only steps first teach the vision path colours (LLaVA 0.92 after 200), which
    # stage 2 keeps (colours 1.0, content accuracy 0.80 after 300 more steps instead of 0.61).
    # None: the family's default (``colour_stage``).
    colour_optim: OptimConfig | None = None
    colour_topics: tuple[str, ...] = ("colours",)
    # Stage 2, every topic. Batch 64 and the 0.1x vision lr were needed with CLIP's pixel
    # mean/std (see make_processor) and are kept; with unit scaling 0.1x and 1x gave the same.
    target_optim: OptimConfig = OptimConfig(steps=800, batch_size=64, seed=0,
                                            vision_lr_scale=0.1)
    draft_optim: OptimConfig = OptimConfig(steps=300, batch_size=64, seed=1,
                                           vision_lr_scale=0.1)
    text_only_optim: OptimConfig = OptimConfig(steps=300, batch_size=64, seed=2)
    # Deepening (the ``deepen`` stage): the trained target grows to the real models' depth
    # (LLaVA-1.5-7B: 32 decoder layers, Qwen2-VL-7B: 28) by inserting identity-initialised
    # layers (``target.deepen``), then the new layers alone are fine-tuned on every topic, so
    # a draft forward costs what it costs beside a 7B target (1 layer of 32), not a third of
    # a 4-layer target's. The drafts then continue from their weights (``--warm-start``).
    deep_layers: int | None = None
    deepen_optim: OptimConfig = OptimConfig(steps=120, batch_size=16, lr=3e-4, warmup_steps=10,
                                            seed=7, log_every=10, checkpoint_every=10)
    warm_start: bool = False                      # drafts continue from the saved ones
    k: int = 6                                    # chain length of the tau measurement
    eval_describe: int = 48                       # held-out items: the shapes_caption ...
    eval_qa: int = 48                             # ... and shapes_qa parquet items

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")

    @property
    def colour_stage(self) -> OptimConfig:
        """Stage 1's optimiser settings: ``colour_optim``, else the family's default."""
        return self.colour_optim or COLOUR_STAGE[self.family]


# The tiny Qwen2-VL vision tower at lr 3e-3 merges the colours (its features of a red and a blue
# square had cosine 0.999 after training; colours loss stuck at 0.44 with batch 16, 32 or 64);
# at lr 1e-3 it learns them (loss 0.26 after 220 steps of batch 32).
COLOUR_STAGE = {
    "llava": OptimConfig(steps=200, batch_size=64, seed=5),
    "qwen2_vl": OptimConfig(steps=400, batch_size=32, lr=1e-3, warmup_steps=20, seed=5),
}
# the later families: Qwen2-VL's settings (their towers are its kin); not tuned separately
COLOUR_STAGE.update({f: COLOUR_STAGE["qwen2_vl"] for f in ("qwen2_5_vl", "qwen3_vl",
                                                           "llava_onevision")})


# ---------------------------------------------------------------------------- building blocks
def make_processor(recipe: Recipe) -> Any:
    """The family's processor with a BPE trained on shapes texts and pixels scaled to [0, 1].

    Unit scaling (mean 0, std 1) keeps the black background at 0, so a patch's feature is
    dominated by the colour it holds. With CLIP's mean/std, black becomes a large constant
    offset that drowns the colour: the same recipe then never learned colours (0.1-0.2
    accuracy on the colours topic after 1600 steps) while unit scaling learned them in 200."""
    tok = train_tokenizer(corpus_texts(recipe.tokenizer_items), recipe.vocab_size, recipe.family)
    processor = tiny_processor(recipe.family, tok)
    processor.image_processor.image_mean = [0.0, 0.0, 0.0]
    processor.image_processor.image_std = [1.0, 1.0, 1.0]
    return processor


def _save(model: PreTrainedModel, processor: Any, path: Path) -> None:
    model.save_pretrained(path)
    processor.save_pretrained(path)


def _language_parameters(model: PreTrainedModel) -> int:
    inner = getattr(model.model, "language_model", model.model)
    return count_parameters(inner) + count_parameters(model.get_output_embeddings())


def read_metrics(out: Path) -> dict:
    path = Path(out) / METRICS
    return json.loads(path.read_text()) if path.is_file() else {"models": {}}


def update_metrics(out: Path, models: dict[str, dict] | None = None, **top_level: Any) -> dict:
    """Merge ``models`` (role -> entry) into ``models`` of ``out/metrics.json``, entry by entry,
    and set any ``top_level`` keys; return the merged metrics."""
    metrics = read_metrics(out)
    metrics.update(top_level)
    for role, entry in (models or {}).items():
        metrics["models"].setdefault(role, {}).update(entry)
    (Path(out) / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


# ---------------------------------------------------------------------------- stages
def _checkpoint(out: Path, role: str) -> Path:
    """Where a killed run of ``role`` resumes from (rerun the same command); deleted once the
    role's model is saved."""
    return out / "checkpoints" / f"{role}.pt"


def train_target_stage(recipe: Recipe, out: Path) -> dict:
    processor = make_processor(recipe)
    model = build_vlm(recipe.family, processor.tokenizer, recipe.target, recipe.target_optim.seed)
    colours = train_target(model, processor, recipe.colour_stage, _checkpoint(out, "colours"),
                           recipe.colour_topics, desc="target (colours)")
    record = train_target(model, processor, recipe.target_optim, _checkpoint(out, "target"))
    _save(model, processor, out / "target")
    _checkpoint(out, "colours").unlink()
    _checkpoint(out, "target").unlink()
    return {"architecture": recipe.target.to_dict(), "parameters": count_parameters(model),
            "language_model_parameters": _language_parameters(model), "train": record,
            "stage1": {**colours, "topics": list(recipe.colour_topics)}}


# decoder layers of LLaVA-1.5-7B, Qwen2-VL-7B, Qwen2.5-VL-7B, Qwen3-VL-8B, LLaVA-OV-7B
DEPTH = {"llava": 32, "qwen2_vl": 28, "qwen2_5_vl": 28, "qwen3_vl": 36, "llava_onevision": 28}


def deepen_stage(recipe: Recipe, out: Path) -> dict:
    """Grow the saved target to ``recipe.deep_layers`` and fine-tune it (see ``Recipe``)."""
    processor = load_processor(out / "target")
    shallow = load_adapter(out / "target").model
    layers = recipe.deep_layers or DEPTH[recipe.family]
    n = shallow.config.text_config.num_hidden_layers
    if n >= layers:
        raise SystemExit(f"{out / 'target'} already has {n} decoder layers (>= {layers}): "
                         "deepen grows a shallower trained target")
    model, placed = deepen(shallow, layers, recipe.deepen_optim.seed)
    inserted = [layer for j, layer in enumerate(decoder_layers(model)) if j not in placed]
    trainable = {id(p) for layer in inserted for p in layer.parameters()}
    for p in model.parameters():  # only the inserted layers learn: the trained ones are kept
        p.requires_grad_(id(p) in trainable)
    record = train_target(model, processor, recipe.deepen_optim, _checkpoint(out, "deepen"),
                          desc=f"deepen {n}->{layers}")
    model.requires_grad_(True)
    _save(model, processor, out / "target")
    _checkpoint(out, "deepen").unlink()
    return {"architecture": {**recipe.target.to_dict(), "layers": layers},
            "parameters": count_parameters(model),
            "language_model_parameters": _language_parameters(model),
            "deepen": {"from_layers": n, "layers": layers, "trained_layers_at": placed,
                       "inserted": "identity (zero o_proj and down_proj), then fine-tuned "
                                   "with every other weight frozen",
                       "train": record}}


def train_draft_stage(recipe: Recipe, out: Path, role: str) -> dict:
    target = load_adapter(out / "target").model
    processor = load_processor(out / "target")
    tok = processor.tokenizer
    shape, cfg = ((recipe.draft_vlm, recipe.draft_optim) if role == "draft_vlm"
                  else (recipe.text_only, recipe.text_only_optim))
    if recipe.warm_start:  # continue from the saved draft (e.g. after the target deepened)
        draft = load_adapter(out / role, role="draft").model
    else:
        draft = (build_vlm(recipe.family, tok, shape, cfg.seed) if role == "draft_vlm"
                 else build_text_lm(recipe.family, tok, shape, cfg.seed))
        init = init_from_target(draft, target, vision=role == "draft_vlm")
    record = distill_draft(draft, target, processor, cfg, text_only=role == "text_only",
                           checkpoint=_checkpoint(out, role))
    _save(draft, processor if role == "draft_vlm" else tok, out / role)
    _checkpoint(out, role).unlink()
    if recipe.warm_start:  # the first training's record stays; this one is added beside it
        return {"continued": {"against": _target_summary(target), "train": record}}
    lm_params = count_parameters(draft) if role == "text_only" else _language_parameters(draft)
    return {"architecture": shape.to_dict(), "parameters": count_parameters(draft),
            "language_model_parameters": lm_params, "init_from_target": init, "train": record}


def _target_summary(target: PreTrainedModel) -> str:
    return f"the {target.config.text_config.num_hidden_layers}-layer target"


def evaluate_stage(recipe: Recipe, out: Path) -> dict[str, dict]:
    """Measured figures of every saved role, loaded from disk as users load them."""
    items = eval_items(recipe.eval_describe, recipe.eval_qa)
    target = load_adapter(out / "target")
    reference = greedy_outputs(target, items)
    text = [target.decode(r) for r in reference]
    results = {"target": {"eval": content_accuracy(text, items).to_dict()}}
    for role in ("draft_vlm", "text_only"):
        if not (out / role / "config.json").is_file():
            continue
        draft = load_adapter(out / role, role="draft")
        text_only = role == "text_only"
        results[role] = {"eval": {
            **model_accuracy(draft, items, prompter=target).to_dict(),
            "speculative": speculative(target, draft, items, recipe.k, text_only,
                                       reference).to_dict()}}
    return results


# ---------------------------------------------------------------------------- CLI
def run(recipe: Recipe, out: Path, stages: Sequence[str], command: str) -> dict:
    """Train ``stages`` (roles) into ``out``, then evaluate every saved role; each trained
    role's entry records the command and environment that made it."""
    out.mkdir(parents=True, exist_ok=True)
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    for stage in stages:
        if stage == "target":
            entry = train_target_stage(recipe, out)
        elif stage == "deepen":
            entry = deepen_stage(recipe, out)
        else:
            entry = train_draft_stage(recipe, out, stage)
        later = next((k for k in ("deepen", "continued") if k in entry), None)
        if later is None:  # a first training: the command and environment of the role
            entry.update(command=command, environment=env)
        else:  # a later stage of a trained role: its own command, the first one's kept
            entry[later].update(command=command, environment=env)
        update_metrics(out, {"target" if stage == "deepen" else stage: entry})
    if _checkpoint(out, "target").parent.is_dir():  # empty once every stage has finished
        _checkpoint(out, "target").parent.rmdir()
    return update_metrics(out, evaluate_stage(recipe, out), family=recipe.family, k=recipe.k,
                          eval_items=f"eval_items({recipe.eval_describe}, {recipe.eval_qa}, "
                          f"seed=0): held-out test-split shapes items")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmms_sd.train.shapes_models",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=FAMILIES)
    parser.add_argument("--out", required=True, type=Path, help="directory of the model suite")
    parser.add_argument("--stages", default=",".join(ROLES),
                        help=f"comma-separated stages, from {STAGES} (deepen: grow the saved "
                        "target to --layers and fine-tune it)")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers of the deepened target (default: the real "
                        f"model's, {DEPTH})")
    parser.add_argument("--deepen-steps", type=int, default=None)
    parser.add_argument("--warm-start", action="store_true",
                        help="drafts continue from the saved ones instead of a fresh init")
    parser.add_argument("--target-steps", type=int, default=None)
    parser.add_argument("--colour-steps", type=int, default=None,
                        help="steps of the target's colours-only first stage")
    parser.add_argument("--draft-steps", type=int, default=None)
    parser.add_argument("--draft-batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a busy 2-core machine)")
    parser.add_argument("--cards", type=Path, default=None,
                        help="also write the model cards into this directory")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    for s in stages:
        if s not in STAGES:
            raise SystemExit(f"unknown stage {s!r}; expected stages from {STAGES}")
    torch.set_num_threads(args.threads)
    recipe = _recipe_from_args(args)
    argv_text = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    metrics = run(recipe, args.out, stages, f"python -m lmms_sd.train.shapes_models {argv_text}")
    if args.cards is not None:
        write_model_cards(metrics, args.cards)
    print(json.dumps({r: m.get("eval") for r, m in metrics["models"].items()}, indent=2))


def _recipe_from_args(args: argparse.Namespace) -> Recipe:
    base = replace(Recipe(args.family), deep_layers=args.layers, warm_start=args.warm_start)
    if args.draft_batch_size is not None:
        base = replace(base, **{name: replace(getattr(base, name),
                                              batch_size=args.draft_batch_size)
                                for name in ("draft_optim", "text_only_optim")})
    if args.deepen_steps is not None:
        base = _with_steps(base, "deepen_optim", args.deepen_steps)
    if args.target_steps is not None:
        base = _with_steps(base, "target_optim", args.target_steps)
    if args.colour_steps is not None:
        base = _with_steps(replace(base, colour_optim=base.colour_stage), "colour_optim",
                           args.colour_steps)
    if args.draft_steps is not None:
        base = _with_steps(_with_steps(base, "draft_optim", args.draft_steps),
                           "text_only_optim", args.draft_steps)
    return base


def _with_steps(recipe: Recipe, name: str, steps: int) -> Recipe:
    optim = getattr(recipe, name)
    warmup = min(optim.warmup_steps, max(0, steps // 10))
    return replace(recipe, **{name: replace(optim, steps=steps, warmup_steps=warmup)})


if __name__ == "__main__":
    main()

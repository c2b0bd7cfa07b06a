"""The shipped MSD head against the shipped draft models: tau and acceptance on held-out items.

    python -m lmms_sd.train.msd_compare --family llava --cards model_cards

For each drafter (the trained MSD head, the 1-layer draft VLM, the text-only draft) and each
tree (MSD's dynamic tree, the same tree with a 16-token budget, a chain of 4): greedy
speculative decoding of held-out shapes ``describe`` items, every output checked token-identical
to the target's own greedy output (else it raises), figures pooled over the items:

  tau               emitted tokens per target decode step (accepted + 1, as MSD reports it)
  acceptance_rate   accepted draft tokens per drafted depth (the chain acceptance rate)
  tree_size         mean draft tokens the target verifies per step
  draft_forwards    mean drafter forwards per step (a draft model's prefill included)

Writes ``lmms_sd/assets/shapes/<family>/msd_metrics.json`` (with the head's training record,
read from ``msd_head/train_record.json``) and, with ``--cards``, the head's model card.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapters.base import HFAdapter
from ..adapters.loading import load_adapter
from ..assets import SHAPES_DIR, shipped_model
from ..core.generate import GenerationConfig
from ..core.interfaces import Drafter
from ..data.shapes import ShapesItem, make_items
from ..drafters.model import ModelDrafter
from ..drafters.msd import load_msd_drafter
from ..drafters.msd_format import load_msd_head
from ..drafters.msd_head import MSDHead
from ..trees import make_builder
from .evaluate import MAX_NEW_TOKENS, greedy_outputs, lossless_decoding

HEAD_ROLE = "msd_head"
METRICS_FILE = "msd_metrics.json"
DRAFTERS = (HEAD_ROLE, "draft_vlm", "text_only")
# row name -> (builder name, settings); the first is MSD's default tree
TREES: dict[str, tuple[str, dict[str, int]]] = {
    "dynamic_59": ("dynamic", {"depth": 5, "top_k": 10, "total_tokens": 59}),
    "dynamic_16": ("dynamic", {"depth": 5, "top_k": 10, "total_tokens": 16}),
    "chain_4": ("chain", {"k": 4}),
}
EVAL_SEED = 0


def describe_items(n: int, seed: int = EVAL_SEED) -> list[ShapesItem]:
    """Held-out test-split ``describe`` items (the long answers, where drafting pays)."""
    return make_items(n, seed, "test", ("describe",))


def head_parameters(head: MSDHead) -> dict[str, int]:
    """Trained parameters (fc + layers) and the target's embedding rows stored beside them."""
    return {"trained": sum(p.numel() for p in head.parameters()),
            "stored_embed_tokens": head.target.embed_tokens.weight.numel()}


def make_drafter(role: str, family: str, target: HFAdapter) -> Drafter:
    """The shipped drafter of ``role`` for the shipped ``target`` of ``family``."""
    if role == HEAD_ROLE:
        return load_msd_drafter(str(shipped_model(family, role)), target.model)
    draft = load_adapter(shipped_model(family, role), role="draft")
    return ModelDrafter(draft, text_only=role == "text_only", vocab_size=target.vocab_size)


def measure(target: HFAdapter, drafter: Drafter, tree: str, settings: dict[str, int],
            items: Sequence[ShapesItem], reference: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Pooled figures of greedy speculative decoding; raises on any output that differs."""
    cfg = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, eos_token_ids=target.eos_token_ids)
    prompts = [target.prepare(it.question, [it.image]) for it in items]
    pooled = lossless_decoding(target, drafter, make_builder(tree, **settings), prompts,
                               reference, cfg, f"{drafter.name} with {tree} {settings}",
                               [it.uid for it in items])
    steps = pooled.decode_steps
    return {"tau": pooled.emitted / steps, "acceptance_rate": pooled.acceptance_rate,
            "tree_size": pooled.tree_nodes / steps, "draft_forwards": pooled.draft_forwards / steps,
            "decode_steps": steps, "new_tokens": pooled.emitted, "n_items": len(items),
            "lossless": True}


def compare(family: str, n_items: int) -> dict[str, Any]:
    """Every (drafter, tree) row on ``n_items`` held-out describe items."""
    target = load_adapter(shipped_model(family, "target"))
    items = describe_items(n_items)
    reference = greedy_outputs(target, items)
    rows = []
    for role in DRAFTERS:
        drafter = make_drafter(role, family, target)
        for name, (tree, settings) in TREES.items():
            rows.append({"drafter": role, "tree": name, "builder": tree, **settings,
                         **measure(target, drafter, tree, settings, items, reference)})
            print(f"{role:10s} {name:11s} tau {rows[-1]['tau']:.2f} "
                  f"acc {rows[-1]['acceptance_rate']:.3f}", flush=True)
    head = load_msd_head(shipped_model(family, HEAD_ROLE), target.model)
    return {"family": family, "head_parameters": head_parameters(head), "rows": rows,
            "eval_items": f"describe_items({n_items}, seed={EVAL_SEED}): held-out test-split "
                          f"shapes describe items, greedy, max_new_tokens {MAX_NEW_TOKENS}",
            "mean_answer_tokens": sum(len(r) for r in reference) / len(reference)}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lmms_sd.train.msd_compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", required=True, choices=("llava", "qwen2_vl"))
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cards", type=Path, default=None, help="write the model card here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    metrics = compare(args.family, args.items)
    record_path = shipped_model(args.family, HEAD_ROLE) / "train_record.json"
    metrics["train"] = json.loads(record_path.read_text()) if record_path.is_file() else None
    metrics["command"] = "python -m lmms_sd.train.msd_compare " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    metrics["environment"] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    out = SHAPES_DIR / args.family / METRICS_FILE
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    if args.cards is not None:
        from .msd_card import write_card
        print(write_card(metrics, args.cards))
    print(out)


if __name__ == "__main__":
    main()

"""Collect acceptance traces by decoding shapes-task prompts with the plain OPT-Tree.

    python -m lmms_sd.calibration.collect --target PATH (--draft PATH | --head PATH) --items N \\
        --out traces.jsonl [--split train] [--seed 0] [--nodes 60] [--threshold 0.5] \\
        [--max-depth 10] [--max-new-tokens 80] [--no-attention]

Every item of ``lmms_sd.data.shapes.make_items(N, seed, split)`` is decoded greedily with a
draft model (a draft VLM, loaded with eager attention to read its image attention, or a text-only
LM) or an MSD head (``--head``: it reports no attention, so ``--no-attention`` is implied), and
the plain OPT-Tree; every verified step becomes trace records (``recording.py``), labelled
from the verify forward the loop runs anyway. Then fit a calibrator offline::

    python -m lmms_sd.calibration.cli fit --traces traces.jsonl --out calibrator.json
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..adapters import HFAdapter, check_same_vocab, load_adapter
from ..core.generate import GenerationConfig, GenerationStats, generate
from ..core.interfaces import Drafter, PromptInputs
from ..data.shapes import SPLITS, make_items
from ..drafters.model import ModelDrafter
from ..drafters.msd import load_msd_drafter
from ..trees.opt import OptBuilder, OptConfig
from .calibrator import vocab_fingerprint
from .features import tokenizer_categories
from .recording import TraceObserver, TracingDrafter, with_attention_tap
from .traces import TraceRecord, write_traces


def load_draft(path: str | Path, target: HFAdapter, attention: bool) -> ModelDrafter:
    """A draft model drafter for ``target``; a draft VLM gets eager attention when its image
    attention is to be read."""
    draft = load_adapter(path, device=target.device, role="draft",
                         attn_implementation="eager" if attention else None)
    check_same_vocab(target, draft)
    return ModelDrafter(draft, text_only=draft.family == "causal_lm",
                        vocab_size=target.vocab_size)


def collect_traces(target: HFAdapter, drafter: Drafter, prompts: Sequence[PromptInputs],
                   cfg: GenerationConfig, opt: OptConfig, categories: np.ndarray,
                   attention: bool = True) -> tuple[list[TraceRecord], list[GenerationStats]]:
    """Decode ``prompts`` with the plain OPT-Tree and return the traces of every verified step
    and each request's statistics."""
    if attention:
        drafter, tap = with_attention_tap(drafter)
    else:
        tap = None
    tracing = TracingDrafter(drafter, tap)
    builder = OptBuilder(opt)
    records: list[TraceRecord] = []
    stats: list[GenerationStats] = []
    for prompt in prompts:
        observer = TraceObserver(tracing, categories, cfg.sampling)
        result = generate(target, prompt, cfg, tracing, builder, target.decode, observer)
        records += observer.records
        stats.append(result.stats)
    return records, stats


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lmms_sd.calibration.collect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, type=Path)
    drafter = ap.add_mutually_exclusive_group(required=True)
    drafter.add_argument("--draft", type=Path, help="a draft model (VLM or text-only LM)")
    drafter.add_argument("--head", type=Path, help="an MSD head in the published layout "
                         "(what *_msd_calibrated steers)")
    ap.add_argument("--items", required=True, type=int)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--split", choices=SPLITS, default="train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nodes", type=int, default=60)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--max-depth", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-attention", action="store_true",
                    help="do not read the draft's image attention (record 0)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.items < 1:
        raise ValueError(f"--items must be >= 1, got {args.items}")
    attention = not args.no_attention and args.head is None
    target = load_adapter(args.target, device=args.device)
    drafter = (load_msd_drafter(str(args.head), target.model) if args.head is not None
               else load_draft(args.draft, target, attention))
    items = make_items(args.items, args.seed, args.split)
    prompts = [target.prepare(it.question, [it.image]) for it in items]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens,
                           eos_token_ids=target.eos_token_ids)
    opt = OptConfig(args.nodes, args.threshold, args.max_depth)
    categories = tokenizer_categories(target.tokenizer, target.vocab_size)
    records, stats = collect_traces(target, drafter, prompts, cfg, opt, categories, attention)
    write_traces(args.out, records, vocab_fingerprint(target.tokenizer.get_vocab()))
    steps = sum(s.decode_steps for s in stats)
    tau = sum(s.accepted + 1 for st in stats for s in st.steps) / max(steps, 1)
    hard = float(np.mean([r.hard for r in records])) if records else 0.0
    print(f"{len(records)} trace records from {len(items)} items ({steps} steps, tau {tau:.3f}, "
          f"hard acceptance {hard:.3f}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

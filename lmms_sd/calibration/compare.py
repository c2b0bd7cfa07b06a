"""tau of the Calibrated OPT-Tree beside the plain OPT-Tree at the same node budget (online mode).

    python -m lmms_sd.calibration.compare --target PATH (--draft PATH | --msd-head PATH) \\
        --items N [--steering thesis|replace] [--split test] [--seed 0] [--nodes N] \\
        [--top-k K] [--max-depth 10] [--threshold 0.2] [--plain-threshold T] \\
        [--train-ratio 0.2] [--label L] [--max-new-tokens 80] [--no-attention] [--out results.json]

Unset tree and label options take the steering's defaults (``online.STEERING_DEFAULTS``).

Shapes items are decoded greedily, as lmms-eval would send them, through ``make_calibrated``:
the first ``ceil(train_ratio * N)`` items collect traces with the plain OPT-Tree, a calibrator is
fitted, and the remaining (measured) items are decoded with the calibrated tree. The measured
items are then decoded again with the plain OPT-Tree of the same node budget, at OPT-Tree's
threshold and at the calibrated tree's, which also yields held-out traces for the calibrator's
ECE. Every output is checked against the target's own greedy output (an error if one differs).

Reported per tree, pooled over measured items: tau (emitted tokens per target step), speed
against the target's own greedy decoding of the same items (wall time), mean tree size and depth,
draft forwards per step, and mean predicted E[A] (``DraftTree.scores`` sum) against mean
accepted drafts per step.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..adapters import HFAdapter, load_adapter
from ..core.generate import GenerationConfig, GenerationStats, generate
from ..core.interfaces import Drafter, PromptInputs
from ..data.shapes import SPLITS, make_items
from ..drafters.msd import load_msd_drafter
from ..trees.opt import OptBuilder, OptConfig
from .collect import load_draft
from .metrics import calibration_report
from .online import AUTO, CalibratedSettings, make_calibrated
from .recording import TraceObserver
from .steering import STEERINGS
from .traces import LABELS, TraceColumns, TraceRecord

TASK = "shapes"


@dataclass(frozen=True)
class TreeFigures:
    """Pooled statistics of one tree over the measured requests."""

    tree: str
    tau: float
    steps: int
    tree_size: float
    tree_depth: float
    draft_forwards_per_step: float
    predicted_accept: float
    accepted: float
    speedup: float

    @staticmethod
    def pool(tree: str, stats: Sequence[GenerationStats], ar_wall: float) -> TreeFigures:
        """``ar_wall``: the target's own greedy decoding time of the same requests."""
        steps = [s for st in stats for s in st.steps]
        n = max(len(steps), 1)
        predicted = [s.expected_accept or 0.0 for s in steps]
        return TreeFigures(tree, sum(s.accepted + 1 for s in steps) / n, len(steps),
                           sum(s.tree_size for s in steps) / n,
                           sum(s.tree_depth for s in steps) / n,
                           sum(st.draft_forwards for st in stats) / n,
                           float(np.mean(predicted)) if steps else 0.0,
                           sum(s.accepted for s in steps) / n,
                           ar_wall / max(sum(st.wall_time for st in stats), 1e-9))


def _decode_all(target: HFAdapter, prompts: Sequence[PromptInputs],
                references: Sequence[list[int]], cfg: GenerationConfig, drafter: Drafter,
                builder: Any, observer: TraceObserver | None, what: str) -> list[GenerationStats]:
    out = []
    for i, (prompt, reference) in enumerate(zip(prompts, references)):
        result = generate(target, prompt, cfg, drafter, builder, target.decode, observer)
        if result.tokens != reference:
            raise AssertionError(f"{what}: request {i} differs from the target's greedy output")
        out.append(result.stats)
    return out


def compare(target: HFAdapter, drafter: Drafter, prompts: Sequence[PromptInputs],
            cfg: GenerationConfig, settings: CalibratedSettings) -> dict[str, Any]:
    """Online calibrated decoding of ``prompts`` and the plain OPT-Tree on the measured ones."""
    plain_ar = [generate(target, p, cfg) for p in prompts]
    references = [r.tokens for r in plain_ar]
    tracing, builder, session = make_calibrated(drafter, settings, target.tokenizer,
                                                target.vocab_size)
    session.plan({TASK: len(prompts)})
    calibrated: list[GenerationStats] = []
    measured: list[int] = []
    for i, prompt in enumerate(prompts):
        phase = session.start_request(TASK, cfg.sampling)
        stats = _decode_all(target, [prompt], [references[i]], cfg, tracing, builder,
                            session.observe, "calibrated OPT-Tree")
        if phase.measured:
            calibrated += stats
            measured.append(i)
    if not measured:
        raise ValueError(f"{len(prompts)} items at train_ratio {settings.train_ratio} leave "
                         f"none to measure")
    held_prompts = [prompts[i] for i in measured]
    held_refs = [references[i] for i in measured]
    ar_wall = sum(plain_ar[i].stats.wall_time for i in measured)
    tracing.keep_logits = True
    held_out = TraceObserver(tracing, session.categories, cfg.sampling)
    figures = [TreeFigures.pool(f"calibrated {settings.steering} (threshold "
                                f"{settings.threshold})", calibrated, ar_wall)]
    for threshold, observer in ((settings.plain_threshold, held_out), (settings.threshold, None)):
        plain = OptBuilder(OptConfig(settings.nodes, threshold, settings.max_depth,
                                     settings.top_k))
        stats = _decode_all(target, held_prompts, held_refs, cfg, tracing, plain, observer,
                            f"plain OPT-Tree (threshold {threshold})")
        figures.append(TreeFigures.pool(f"plain (threshold {threshold})", stats, ar_wall))
    cal = session.calibrators[TASK]
    return {"settings": asdict(settings), "items": len(prompts), "measured_items": len(measured),
            "calibration": session.summary()[TASK],
            "held_out_ece": _ece(cal, held_out.records),
            "trees": [asdict(f) for f in figures]}


def _ece(calibrator: Any, records: list[TraceRecord]) -> dict[str, float] | None:
    if not records:
        return None
    cols = TraceColumns.stack(records)
    rep = calibration_report(cols.features.confidence, calibrator.predict(cols.features),
                             cols.label(calibrator.label))
    return asdict(rep)


def markdown(result: dict[str, Any]) -> str:
    lines = ["| tree | tau | speedup | tree size | depth | draft fwd/step | predicted E[A] | "
             "accepted |", "|---|---|---|---|---|---|---|---|"]
    for f in result["trees"]:
        lines.append(f"| {f['tree']} | {f['tau']:.3f} | {f['speedup']:.2f} | "
                     f"{f['tree_size']:.1f} | "
                     f"{f['tree_depth']:.2f} | {f['draft_forwards_per_step']:.2f} | "
                     f"{f['predicted_accept']:.2f} | {f['accepted']:.2f} |")
    ece = result["held_out_ece"]
    if ece is not None:
        lines.append(f"\nheld-out ECE ({result['calibration']['label']} label, n={ece['n']}): "
                     f"raw {ece['ece_before']:.4f} -> calibrated {ece['ece_after']:.4f}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lmms_sd.calibration.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, type=Path)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--draft", type=Path, help="a draft model")
    source.add_argument("--msd-head", type=Path, help="an MSD head (published layout)")
    ap.add_argument("--items", required=True, type=int)
    ap.add_argument("--steering", choices=STEERINGS, default="thesis")
    ap.add_argument("--split", choices=SPLITS, default="test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--max-depth", type=int, default=10)
    ap.add_argument("--threshold", type=float, default=0.2)
    ap.add_argument("--plain-threshold", type=float, default=None)
    ap.add_argument("--train-ratio", type=float, default=0.2)
    ap.add_argument("--label", choices=(AUTO, *LABELS), default=None)
    ap.add_argument("--min-samples", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--out", type=Path)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    attention = not args.no_attention
    target = load_adapter(args.target, device=args.device)
    if args.msd_head is not None:
        drafter = load_msd_drafter(str(args.msd_head), target.model)
    else:
        drafter = load_draft(args.draft, target, attention)
    items = make_items(args.items, args.seed, args.split)
    prompts = [target.prepare(it.question, [it.image]) for it in items]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens,
                           eos_token_ids=target.eos_token_ids)
    settings = CalibratedSettings(args.steering, nodes=args.nodes, top_k=args.top_k,
                                  max_depth=args.max_depth,
                                  threshold=args.threshold, plain_threshold=args.plain_threshold,
                                  train_ratio=args.train_ratio, label=args.label,
                                  min_samples=args.min_samples, attention=attention)
    result = compare(target, drafter, prompts, cfg, settings)
    result["command"] = "python -m lmms_sd.calibration.compare " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print(markdown(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The draft studies on one model suite in one command: potential, records, pictures, efficiency.

    python -m lmms_sd.bench.studies --target T --draft-vlm D --text-only X --items 8 --out DIR \
        [--methods draft_vlm:chain:k=4 text_only:chain:k=4] [--self-draft] [--efficiency]

Writes under ``--out``:
  potential.json / .md    KL(target || draft) and measured tau per draft (``potential.py``)
  records.jsonl           one record per (method, prompt) in the lmms-eval layer's format plus
                          ``method`` and ``match_ar`` (greedy output == the target's own)
  plots/                  trajectories, acceptance by category and draft, acceptance lengths
                          (``plots.py``)
  efficiency.json / .md   with ``--efficiency``: the oracle engine study (``efficiency.py``)
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.generate import GenerationConfig, generate
from ..core.interfaces import PromptInputs
from ..lmms_eval.speed import Record, sample_stats
from .methods import Method, make_drafter

DEFAULT_METHODS = ("draft_vlm:chain:k=4", "text_only:chain:k=4")


def collect_records(models: dict[str, Any], prompts: Sequence[PromptInputs],
                    methods: Sequence[str], max_new_tokens: int,
                    alpha: float = 1.0) -> list[Record]:
    """Decode every prompt with every method (``methods.py`` specs; the oracle included, right
    with probability ``alpha``) and
    return one record per decode, labelled with its method and checked against the target's
    own greedy output (``match_ar``)."""
    target = models["target"]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=target.eos_token_ids)
    refs = [generate(target, p, cfg).tokens for p in prompts]
    records: list[Record] = []
    for spec in methods:
        method = Method.parse(spec)
        builder = method.builder()
        for i, (prompt, ref) in enumerate(zip(prompts, refs)):
            drafter = None if method.drafter is None else make_drafter(
                method.drafter, models, ref, alpha, seed=i)
            res = generate(target, prompt, cfg, drafter, builder, target.decode)
            records.append({"method": spec, "task": "shapes_describe", "doc_id": i,
                            "greedy": True, "stats": sample_stats(res),
                            "match_ar": res.tokens == ref})
    return records


def write_jsonl(path: Path, records: Sequence[Record]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lmms_sd.bench.studies", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft-vlm", dest="draft_vlm", default=None)
    ap.add_argument("--text-only", dest="text_only", default=None)
    ap.add_argument("--methods", nargs="+", default=None,
                    help=f"default: {' '.join(DEFAULT_METHODS)} (those whose draft was given)")
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--k", type=int, default=4, help="chain length of the potential's tau")
    ap.add_argument("--self-draft", action="store_true",
                    help="add the target as its own draft to the potential (KL 0)")
    ap.add_argument("--alpha", type=float, default=0.7, help="oracle acceptance probability")
    ap.add_argument("--efficiency", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from ..adapters.loading import check_same_vocab, load_adapter
    from . import efficiency, plots, potential

    out = Path(args.out)
    models = {"target": load_adapter(args.target)}
    for role in ("draft_vlm", "text_only"):
        if getattr(args, role) is not None:
            models[role] = load_adapter(getattr(args, role), role="draft")
            check_same_vocab(models["target"], models[role])
    drafts = {r: m for r, m in models.items() if r != "target"}
    if args.self_draft:
        drafts["target (self)"] = load_adapter(args.target, role="draft")
    if not drafts:
        raise SystemExit("give at least one draft (--draft-vlm, --text-only or --self-draft)")
    target = models["target"]
    prompts = potential.study_prompts(target, args.items)

    pot = potential.potential(target, drafts, prompts,
                              potential.PotentialConfig(args.max_new_tokens, args.k))
    out.mkdir(parents=True, exist_ok=True)
    (out / "potential.json").write_text(json.dumps(pot, indent=2))
    (out / "potential.md").write_text(potential.to_markdown(pot, f"Draft potential: {args.target}"))
    methods = args.methods or [m for m in DEFAULT_METHODS if m.split(":")[0] in models]
    records = collect_records(models, prompts, methods, args.max_new_tokens, args.alpha)
    write_jsonl(out / "records.jsonl", records)
    for r in records:
        r["label"] = r["method"]
    plots.plot_all(records, plots.token_decoder(target.tokenizer), out / "plots")
    print(potential.to_markdown(pot))
    if args.efficiency:
        cfg = efficiency.EfficiencyConfig(max_new_tokens=args.max_new_tokens)
        result = efficiency.measure(target, prompts[:4], cfg)
        from .run import machine

        meta = {"target": args.target, "items": len(prompts[:4]),
                "max_new_tokens": cfg.max_new_tokens, "repeats": cfg.repeats, "machine": machine()}
        print(efficiency.write(out, result, meta))


if __name__ == "__main__":
    main()

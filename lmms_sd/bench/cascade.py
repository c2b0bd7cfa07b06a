"""Cascade study: a single draft vs two- and three-level cascades (CS Drafting), same prompts.

    python -m lmms_sd.bench.cascade --family llava --items 8 --out bench/results/cascade_llava
    python -m lmms_sd.bench.cascade --sweep ...   # k_matrix x lenience grid

For each configuration: tau, wall time and speedup over autoregressive decoding (our loop),
and the published cost model ("model_parameters": units proportional to parameter count, here
the models' real parameter counts in millions; every draft forward counted), with the speedup
that cost model predicts. Greedy output is checked against autoregressive decoding.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..core.generate import GenerationConfig, generate
from ..drafters.cascade import CascadeConfig, CascadeDrafter
from ..drafters.cost import simulate_cost
from ..drafters.model import ModelDrafter
from ..drafters.ngram import MaGDrafter
from ..trees import make_builder
from .run import load_models, machine, shapes_prompts, to_markdown


@dataclass(frozen=True)
class CascadeSpec:
    name: str
    drafts: tuple[str, ...]                      # roles, large to small; "mag" = statistical
    k_matrix: tuple[tuple[int, ...], ...] = ()   # empty: a single draft with a chain of k
    lenience: float = 1.0
    k: int = 4


DEFAULT_SPECS = (
    CascadeSpec("draft_vlm, chain k=4", ("draft_vlm",)),
    CascadeSpec("draft_vlm > text_only", ("draft_vlm", "text_only"), ((2, 2), (0, 2)), 1.0),
    CascadeSpec("draft_vlm > mag, L=2", ("draft_vlm", "mag"), ((2, 2), (0, 3)), 2.0),
    CascadeSpec("draft_vlm > text_only > mag, L=2", ("draft_vlm", "text_only", "mag"),
                ((2, 1, 1), (0, 2, 2), (0, 0, 2)), 2.0),
)


def sweep_specs(ks: Sequence[int] = (2, 3, 4), lenience: Sequence[float] = (1.0, 2.0, 4.0)
                ) -> list[CascadeSpec]:
    """A grid over the published knobs: draft_vlm > text_only > mag with k_matrix
    ((k, 1, 1), (0, k, 2), (0, 0, 2)) for each k and lenience L."""
    return [CascadeSpec(f"draft_vlm > text_only > mag, k={k}, L={L:g}",
                        ("draft_vlm", "text_only", "mag"), ((k, 1, 1), (0, k, 2), (0, 0, 2)), L)
            for k in ks for L in lenience]


COLUMNS = ("method", "tau", "wall_s", "speedup", "cost_units", "cost_speedup", "mismatches")


def _draft(role: str, models: dict[str, Any]) -> Any:
    vocab = models["target"].vocab_size
    if role == "mag":
        return MaGDrafter(vocab)
    return ModelDrafter(models[role], text_only=role == "text_only", vocab_size=vocab, name=role)


def _params_m(adapter: Any) -> float:
    return sum(p.numel() for p in adapter.model.parameters()) / 1e6


def run(models: dict[str, Any], prompts: Sequence[Any], specs: Sequence[CascadeSpec],
        max_new_tokens: int) -> list[dict]:
    target = models["target"]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=target.eos_token_ids)
    ar = [generate(target, p, cfg, decode=target.decode) for p in prompts]
    ar_wall = sum(r.stats.wall_time for r in ar)
    units = {role: _params_m(m) for role, m in models.items()}
    rows = [{"method": "ar", "tau": 1.0, "wall_s": ar_wall, "speedup": 1.0,
             "cost_units": sum(r.stats.new_tokens for r in ar) * units["target"],
             "cost_speedup": 1.0, "mismatches": 0}]
    for spec in specs:
        wall, steps, emitted, cost, mismatches = 0.0, 0, 0, 0.0, 0
        for prompt, ref in zip(prompts, ar):
            drafts = [_draft(r, models) for r in spec.drafts]
            if spec.k_matrix:
                drafter = CascadeDrafter(drafts, CascadeConfig.of(spec.k_matrix, spec.lenience))
                builder = make_builder("cascade")
            else:
                drafter, builder = drafts[0], make_builder("chain", k=spec.k)
            res = generate(target, prompt, cfg, drafter, builder, target.decode)
            mismatches += res.tokens != ref.tokens
            wall += res.stats.wall_time
            steps += res.stats.decode_steps
            emitted += sum(s.accepted + 1 for s in res.stats.steps)
            counts = (dict(zip(spec.drafts, drafter.counts().forwards)) if spec.k_matrix
                      else {spec.drafts[0]: res.stats.draft_forwards})
            cost += simulate_cost("target", res.stats.target_forwards, counts,
                                  res.stats.new_tokens, counting="forwards",
                                  overrides={**units, "mag": 0.0}).total
        rows.append({"method": spec.name, "tau": emitted / steps if steps else None,
                     "wall_s": wall, "speedup": ar_wall / wall, "cost_units": cost,
                     "cost_speedup": rows[0]["cost_units"] / cost, "mismatches": mismatches})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lmms_sd.bench.cascade", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="llava", choices=("llava", "qwen2_vl"))
    for role in ("target", "draft_vlm", "text_only"):
        ap.add_argument(f"--{role.replace('_', '-')}", dest=role, default=None)
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--sweep", action="store_true",
                    help="the k_matrix x lenience grid of sweep_specs() instead of the defaults")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = load_models(args.family, {r: getattr(args, r) for r in ("target", "draft_vlm", "text_only")})
    models.pop("msd", None)
    specs = sweep_specs() if args.sweep else DEFAULT_SPECS
    rows = run(models, shapes_prompts(models["target"], args.items), specs, args.max_new_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cascade.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    md = to_markdown(rows, f"{args.family}, {args.items} shapes describe prompts; cost units = "
                           f"parameters (M) per forward; {machine()}\n", COLUMNS)
    (out / "cascade.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

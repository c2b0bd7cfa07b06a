"""Draft potential: KL(target || draft) on the target's own continuations, beside measured tau.

    python -m lmms_sd.bench.potential --target PATH --drafts vlm=PATH text=PATH --items 8 --out DIR

The Sequoia tree study ranks drafts before using them by how far their next-token distributions
are from the target's. For each prompt the target decodes greedily (its continuation y, EOS
included); then the target and every draft read prompt + y in one teacher-forced prefill and, at
each position i of y, we compare the distributions over y_i:

  KL_i = sum_x p_target(x | prompt, y_<i) (log p_target(x | ...) - log p_draft(x | ...))

A text-only draft reads the prompt without its image tokens, so positions are aligned from the
end (the last |y| next-token rows of each model). A draft whose vocabulary is smaller than the
target's (e.g. 32000 under llava-hf's padded 32064) is compared on the shared ids, both
distributions renormalised there. Reported per draft, pooled over all positions:

  kl            mean KL_i (nats); the ranking key, smallest first
  top1_match    share of positions where the draft's argmax is y_i: the greedy acceptance rate a
                draft would have if every position were offered
  tau, acceptance_rate   measured by decoding with the draft in a chain of ``--k`` (default 4)
A Spearman rank correlation of kl against tau is reported when there are at least three drafts.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..adapters.base import HFAdapter, extend_prompt
from ..core.generate import GenerationConfig, generate
from ..core.interfaces import PromptInputs
from ..drafters.model import ModelDrafter
from ..lmms_eval.speed import sample_stats, summarize
from ..trees import make_builder


@dataclass(frozen=True)
class PotentialConfig:
    max_new_tokens: int = 48
    k: int = 4  # chain length of the measured acceptance

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.k < 1:
            raise ValueError(f"chain length k must be >= 1, got {self.k}")


def next_token_logits(model: HFAdapter, prompt: PromptInputs, continuation: list[int]) -> Tensor:
    """# [n, V] the model's logits for each of the n continuation tokens, from one prefill of
    prompt + continuation (rows aligned from the end, so a text-only model lines up)."""
    n = len(continuation)
    out = model.prefill(extend_prompt(prompt, torch.tensor(continuation, dtype=torch.long)))
    return out.logits[-(n + 1):-1].float()


def kl_per_position(target_logits: Tensor, draft_logits: Tensor) -> Tensor:  # [n]
    """KL(target || draft) per row over the shared vocabulary (the first min(V_t, V_d) ids).

    target_logits: # [n, V_t]; draft_logits: # [n, V_d]
    """
    if target_logits.shape[0] != draft_logits.shape[0]:
        raise ValueError(f"{target_logits.shape[0]} target rows against {draft_logits.shape[0]} "
                         "draft rows")
    v = min(target_logits.shape[-1], draft_logits.shape[-1])
    log_p = F.log_softmax(target_logits[:, :v].double(), dim=-1)
    log_q = F.log_softmax(draft_logits[:, :v].double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _chain_records(target: HFAdapter, draft: HFAdapter, prompts: Sequence[PromptInputs],
                   gen: GenerationConfig, k: int) -> tuple[list[dict], list[list[int]]]:
    records, outputs = [], []
    for prompt in prompts:
        drafter = ModelDrafter(draft, text_only=draft.family == "causal_lm",
                               vocab_size=target.vocab_size)
        res = generate(target, prompt, gen, drafter, make_builder("chain", k=k))
        records.append({"stats": sample_stats(res)})
        outputs.append(res.tokens)
    return records, outputs


def potential(target: HFAdapter, drafts: dict[str, HFAdapter], prompts: Sequence[PromptInputs],
              cfg: PotentialConfig) -> dict:
    """``{"rows": [...] ranked by kl, "spearman_kl_tau": float | None}`` (see the docstring).
    Every draft must be its own adapter instance (drafting runs beside the target's cache)."""
    for name, draft in drafts.items():
        if draft is target:
            raise ValueError(f"draft {name!r} is the target adapter itself: load the checkpoint "
                             "again to use it as its own draft")
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, eos_token_ids=target.eos_token_ids)
    conts = [generate(target, p, gen).tokens for p in prompts]
    target_rows = [next_token_logits(target, p, c) for p, c in zip(prompts, conts)]
    rows = []
    for name, draft in drafts.items():
        kl, match = [], []
        for prompt, cont, t_logits in zip(prompts, conts, target_rows):
            d_logits = next_token_logits(draft, prompt, cont)
            kl.append(kl_per_position(t_logits, d_logits))
            match.append(d_logits.argmax(-1).cpu() == torch.tensor(cont))
        records, outputs = _chain_records(target, draft, prompts, gen, cfg.k)
        summary = summarize(records)
        kls = torch.cat(kl)
        rows.append({"draft": name, "kl": float(kls.mean()), "kl_median": float(kls.median()),
                     "top1_match": float(torch.cat(match).float().mean()),
                     "positions": len(kls), "tau": summary.get("tau"),
                     "acceptance_rate": summary.get("acceptance_rate"),
                     "mismatches": sum(o != c for o, c in zip(outputs, conts))})
    rows.sort(key=lambda r: r["kl"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return {"rows": rows, "spearman_kl_tau": _spearman([r["kl"] for r in rows],
                                                       [r["tau"] for r in rows])}


def _spearman(x: list[float], y: list[float | None]) -> float | None:
    if len(x) < 3 or any(v is None for v in y):
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def study_prompts(target: HFAdapter, n: int, seed: int = 1) -> list[PromptInputs]:
    """Shapes describe prompts: with the image for a VLM target, the question alone for an LM."""
    from ..data.shapes import make_items

    items = make_items(n, seed, "test", ("describe",))
    if target.family == "causal_lm":
        return [target.prepare(it.question) for it in items]
    return [target.prepare(it.question, [it.image]) for it in items]


COLUMNS = ("rank", "draft", "kl", "kl_median", "top1_match", "tau", "acceptance_rate",
           "positions", "mismatches")


def to_markdown(result: dict, header: str = "") -> str:
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [header, ""] if header else []
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in result["rows"]]
    lines += ["", f"Spearman(kl, tau): {fmt(result['spearman_kl_tau'])}"]
    return "\n".join(lines) + "\n"


def _named_paths(items: Sequence[str]) -> dict[str, str]:
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--drafts takes NAME=PATH, got {item!r}")
        if name in named:
            raise SystemExit(f"draft name {name!r} given twice")
        named[name] = path
    return named


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m lmms_sd.bench.potential", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--drafts", nargs="+", required=True, metavar="NAME=PATH")
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from ..adapters.loading import check_same_vocab, load_adapter

    target = load_adapter(args.target)
    drafts = {n: load_adapter(p, role="draft") for n, p in _named_paths(args.drafts).items()}
    for draft in drafts.values():
        check_same_vocab(target, draft)
    cfg = PotentialConfig(args.max_new_tokens, args.k)
    result = potential(target, drafts, study_prompts(target, args.items), cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"target": args.target, "drafts": _named_paths(args.drafts), "items": args.items,
            **asdict(cfg)}
    (out / "potential.json").write_text(json.dumps({"meta": meta, **result}, indent=2))
    md = to_markdown(result, f"Draft potential on {args.items} shapes describe prompts "
                             f"(target {args.target}); tau with a chain of k={cfg.k}")
    (out / "potential.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()

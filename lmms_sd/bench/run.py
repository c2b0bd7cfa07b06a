"""Speed benchmark: every method on the same prompts, in one process, medians over repeats.

    python -m lmms_sd.bench.run --family llava --items 8 --repeats 3 --out bench/results/llava

Methods (``--methods``, see ``methods.py``) run through the lmms_sd loop; ``<drafter>:auto``
plans its tree at start-up (``lmms_sd/trees/auto.py``). With ``--hf`` the table also has
Hugging Face ``generate`` (greedy), assisted generation with the draft VLM
(``assistant_model=``, the peer to beat) and prompt-lookup decoding
(``prompt_lookup_num_tokens=``, beside our MaG drafter ``mag:chain:k=10``).

Timing: an untimed ``ar`` pass gives the reference outputs, each method decodes the first prompt
once untimed, then every repeat runs all methods on prompt 1, all on prompt 2, ... with their
order rotated. Writes ``bench.json`` and ``bench.md``: wall time, tokens/s, speedup over ``ar``
(our own autoregressive loop, same prompts), ``ceiling`` = tau x t1 / t_verify(mean tree size
+ 1) (the speedup of a loop with free drafts and no overhead; t from target forwards timed at
mid-generation context), tau, acceptance rate, target forwards per token, and greedy
mismatches against ``ar`` (must be 0). The header names the machine and the thread count.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from ..adapters.base import extend_prompt
from ..adapters.timing import COST_SIZES, forward_costs
from ..core.generate import GenerationConfig, generate
from ..core.interfaces import PromptInputs
from ..lmms_eval.autotree import plan_at_startup
from ..lmms_eval.speed import sample_stats, summarize
from ..trees import auto_config
from ..trees.auto import CostCurve
from .methods import DEFAULT_METHODS, Method, make_drafter

ROLES = ("target", "draft_vlm", "text_only", "msd_head")
COLUMNS = ("method", "wall_s", "tokens_per_s", "speedup", "ceiling", "tau", "acceptance_rate",
           "target_fwd_per_token", "mismatches")


def load_models(family: str, paths: dict[str, str | None]) -> dict[str, Any]:
    """Adapters by role; roles without a path fall back to the shipped shapes models. The MSD
    head (role ``msd_head``) becomes ``models["msd"]``, a factory of fresh MSD drafters."""
    from ..adapters.loading import load_adapter
    from ..drafters.msd import load_msd_drafter

    models: dict[str, Any] = {}
    head = paths.pop("msd_head", None)
    for role, path in paths.items():
        if path is None:
            from ..assets import shipped_model

            try:
                path = str(shipped_model(family, role))
            except (FileNotFoundError, ValueError):
                continue
        models[role] = load_adapter(path, role="target" if role == "target" else "draft")
    if "target" not in models:
        raise ValueError("no target model: pass --target or ship one")
    if head is None:
        from ..assets import shipped_model

        try:
            head = str(shipped_model(family, "msd_head"))
        except (FileNotFoundError, ValueError):
            return models
    models["msd"] = lambda: load_msd_drafter(head, models["target"].model)
    return models


def shapes_prompts(target: Any, n: int, seed: int = 1) -> list[PromptInputs]:
    """``n`` describe questions of the shapes test split, prepared for ``target``."""
    from ..data.shapes import make_items

    return [target.prepare(it.question, [it.image]) for it in make_items(n, seed, "test", ("describe",))]


Job = Callable[[int], tuple[float, dict | None, list[int]]]  # prompt index -> (s, record, out)


def _loop_job(target: Any, prompts: Sequence[PromptInputs], cfg: GenerationConfig,
              method: Method, models: dict[str, Any], refs: list[list[int]], alpha: float,
              builder: Callable | None) -> Job:
    def job(i: int) -> tuple[float, dict, list[int]]:
        drafter = None if method.drafter is None else make_drafter(
            method.drafter, models, refs[i] if refs else None, alpha, seed=i)
        res = generate(target, prompts[i], cfg, drafter, builder, target.decode)
        return res.stats.wall_time, {"method": method.name, "doc_id": i,
                                     "stats": sample_stats(res)}, res.tokens
    return job


def _hf_job(target: Any, prompts: Sequence[PromptInputs], cfg: GenerationConfig,
            **kwargs: Any) -> Job:
    def job(i: int) -> tuple[float, None, list[int]]:
        t0 = time.perf_counter()
        out = target.hf_generate(prompts[i], cfg.max_new_tokens, **kwargs)
        return time.perf_counter() - t0, None, out
    return job


def _planned_builder(method: Method, target: Any, models: dict[str, Any], prompt: PromptInputs,
                     cfg: GenerationConfig, reference: list[int], alpha: float
                     ) -> tuple[Callable | None, dict | None]:
    """The method's builder; ``tree=auto`` (and its special cases) planned on ``prompt``."""
    auto = None if method.drafter is None else auto_config(method.tree, **dict(method.tree_params))
    if auto is None:
        return method.builder(), None
    drafter = make_drafter(method.drafter, models, reference, alpha, seed=0)
    startup, builder = plan_at_startup(target, drafter, prompt, cfg, auto, target.decode)
    return builder, startup.to_dict()


def run(models: dict[str, Any], prompts: Sequence[PromptInputs], methods: Sequence[str],
        max_new_tokens: int, repeats: int, hf: bool = False, alpha: float = 1.0,
        lookup_tokens: int = 10) -> tuple[list[dict], list[dict]]:
    """One row per method (see ``COLUMNS``) and the per-sample records of each method's last
    repeat. An untimed pass of ``ar`` gives the reference outputs; every method then decodes
    the first prompt once untimed (``tree=auto`` plans there); the timed passes interleave the
    methods per prompt, rotating their order, so drift and cold starts hit all alike."""
    target = models["target"]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=target.eos_token_ids)
    specs = ["ar"] + [m for m in methods if m != "ar"]
    refs = [generate(target, p, cfg).tokens for p in prompts]  # untimed: reference + warm-up
    jobs: dict[str, Job] = {}
    plans: dict[str, dict] = {}
    for spec in specs:
        method = Method.parse(spec)
        builder, plan = _planned_builder(method, target, models, prompts[0], cfg, refs[0], alpha)
        if plan is not None:
            plans[spec] = plan
        jobs[spec] = _loop_job(target, prompts, cfg, method, models, refs, alpha, builder)
    if hf:
        jobs["hf_generate"] = _hf_job(target, prompts, cfg)
        if "draft_vlm" in models:
            jobs["hf_assisted(draft_vlm)"] = _hf_job(target, prompts, cfg,
                                                     assistant=models["draft_vlm"])
        jobs[f"hf_prompt_lookup({lookup_tokens})"] = _hf_job(target, prompts, cfg,
                                                             prompt_lookup=lookup_tokens)
    names = list(jobs)
    for name in names:
        jobs[name](0)  # warm-up, untimed
    walls = {n: [0.0] * repeats for n in names}
    records: dict[str, list[dict]] = {n: [] for n in names}
    outputs: dict[str, list[list[int]]] = {n: [] for n in names}
    for r in tqdm(range(repeats), desc="repeats"):
        for i in range(len(prompts)):
            shift = (r * len(prompts) + i) % len(names)
            for name in names[shift:] + names[:shift]:
                seconds, record, out = jobs[name](i)
                walls[name][r] += seconds
                if r == repeats - 1:
                    records[name] += [record] if record is not None else []
                    outputs[name].append(out)
    costs = CostCurve.of(_verify_costs(target, prompts[0], refs[0], records))
    ar_wall = statistics.median(walls["ar"])
    rows = [_row(n, walls[n], records[n] or None, outputs[n], refs, ar_wall, costs, plans.get(n))
            for n in names]
    return rows, [rec for n in names for rec in records[n]]


def _verify_costs(target: Any, prompt: PromptInputs, reference: list[int],
                  records: dict[str, list[dict]]) -> dict[int, float]:
    """Target forward seconds of n tokens at mid-generation context, for n up to the largest
    verified tree (root included)."""
    largest = max([1] + [s for rs in records.values() for r in rs
                         for s in r["stats"]["tree_size_per_step"]]) + 1
    sizes = sorted({n for n in COST_SIZES if n < largest} | {largest})
    target.prefill(extend_prompt(prompt, torch.tensor(reference[: len(reference) // 2])))
    return forward_costs(target, reference[0], sizes)


def _row(name: str, walls: list[float], records: list[dict] | None, outputs: list[list[int]],
         refs: list[list[int]], ar_wall: float, costs: CostCurve, plan: dict | None) -> dict:
    wall = statistics.median(walls)
    tokens = sum(len(o) for o in outputs)
    row: dict[str, Any] = {"method": name, "wall_s": wall, "walls_s": walls, "tokens": tokens,
                           "tokens_per_s": tokens / wall if wall else None,
                           "speedup": ar_wall / wall if wall else None,
                           "mismatches": sum(o != r for o, r in zip(outputs, refs))}
    if records is not None:
        summary = summarize(records)
        row.update(tau=summary.get("tau"), acceptance_rate=summary.get("acceptance_rate"),
                   target_fwd_per_token=summary.get("target_forwards_per_token"))
        sizes = [n for r in records for n in r["stats"]["tree_size_per_step"]]
        if sizes and row["tau"]:
            mean = sum(sizes) / len(sizes)
            row["verify_over_t1"] = costs(mean + 1) / costs(1)
            row["ceiling"] = row["tau"] / row["verify_over_t1"]
    if plan is not None:
        row["planned_tree"] = plan["tree"]
    return row


def to_markdown(rows: list[dict], header: str = "", columns: Sequence[str] = COLUMNS) -> str:
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = [header] if header else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lmms_sd.bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="llava", choices=("llava", "qwen2_vl"))
    for role in ROLES:
        ap.add_argument(f"--{role.replace('_', '-')}", dest=role, default=None,
                        help=f"{role} checkpoint (default: the shipped shapes model)")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=1.0, help="oracle acceptance probability")
    ap.add_argument("--hf", action="store_true", help="add HF generate, assisted generation "
                    "with the draft VLM and prompt-lookup decoding")
    ap.add_argument("--lookup-tokens", type=int, default=10,
                    help="prompt_lookup_num_tokens of HF prompt-lookup decoding")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 avoids oversubscription on a busy small machine)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = load_models(args.family, {r: getattr(args, r) for r in ROLES})
    prompts = shapes_prompts(models["target"], args.items)
    rows, records = run(models, prompts, args.methods, args.max_new_tokens, args.repeats, args.hf,
                        args.alpha, args.lookup_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"family": args.family, "items": args.items, "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats, "machine": machine()}
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = to_markdown(rows, f"{args.family}, {args.items} shapes describe prompts, "
                           f"max {args.max_new_tokens} new tokens, median of {args.repeats}, "
                           f"methods interleaved per prompt; {meta['machine']}\n")
    planned = [f"- {r['method']}: {r['planned_tree']}" for r in rows if r.get("planned_tree")]
    if planned:
        md += "\nPlanned at start-up (tree=auto):\n" + "\n".join(planned) + "\n"
    (out / "bench.md").write_text(md)
    with (out / "records.jsonl").open("w") as f:  # per-sample stats of the last repeat
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(md)


if __name__ == "__main__":
    main()

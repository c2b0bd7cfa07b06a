"""Speed benchmark: every method on the same prompts, in one process, medians over repeats.

    python -m lmms_sd.bench.run --family llava --items 8 --repeats 3 --out bench/results/llava

Methods (``--methods``, see ``methods.py``) run through the lmms_sd loop; with ``--hf`` the
table also has Hugging Face ``generate`` (greedy) and assisted generation with the draft VLM
(``assistant_model=``), the peer to beat. Writes ``bench.json`` and ``bench.md``:
wall time, tokens/s, speedup over ``ar`` (our own autoregressive loop, same prompts), tau,
acceptance rate, target forwards per token, and greedy mismatches against ``ar`` (must be 0).
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

from ..core.generate import GenerationConfig, generate
from ..core.interfaces import PromptInputs
from ..lmms_eval.speed import sample_stats, summarize
from .methods import DEFAULT_METHODS, Method, make_drafter

ROLES = ("target", "draft_vlm", "text_only", "msd_head")
COLUMNS = ("method", "wall_s", "tokens_per_s", "speedup", "tau", "acceptance_rate",
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


def _time_loop(target: Any, prompts: Sequence[PromptInputs], cfg: GenerationConfig,
               method: Method, models: dict[str, Any], refs: list[list[int]] | None,
               alpha: float) -> tuple[float, list[dict], list[list[int]]]:
    builder = method.builder()
    records, outputs, wall = [], [], 0.0
    for i, prompt in enumerate(prompts):
        drafter = None if method.drafter is None else make_drafter(
            method.drafter, models, refs[i] if refs else None, alpha, seed=i)
        res = generate(target, prompt, cfg, drafter, builder, target.decode)
        wall += res.stats.wall_time
        records.append({"method": method.name, "doc_id": i, "stats": sample_stats(res)})
        outputs.append(res.tokens)
    return wall, records, outputs


def _time_hf(target: Any, prompts: Sequence[PromptInputs], cfg: GenerationConfig,
             assistant: Any | None) -> tuple[float, list[list[int]]]:
    wall, outputs = 0.0, []
    for prompt in prompts:
        t0 = time.perf_counter()
        outputs.append(target.hf_generate(prompt, cfg.max_new_tokens, assistant=assistant))
        wall += time.perf_counter() - t0
    return wall, outputs


def run(models: dict[str, Any], prompts: Sequence[PromptInputs], methods: Sequence[str],
        max_new_tokens: int, repeats: int, hf: bool = False,
        alpha: float = 1.0) -> tuple[list[dict], list[dict]]:
    """One row per method (see ``COLUMNS``) and the per-sample records of each method's last
    repeat; ``ar`` is always run first as the reference."""
    target = models["target"]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=target.eos_token_ids)
    specs = ["ar"] + [m for m in methods if m != "ar"]
    jobs: list[tuple[str, Callable[[], tuple[float, list[dict] | None, list[list[int]]]]]] = []
    refs: list[list[int]] = []
    for spec in specs:
        method = Method.parse(spec)
        jobs.append((spec, lambda m=method: _time_loop(target, prompts, cfg, m, models, refs, alpha)))
    if hf:
        jobs.append(("hf_generate", lambda: (*_no_records(_time_hf(target, prompts, cfg, None)),)))
        if "draft_vlm" in models:
            jobs.append(("hf_assisted(draft_vlm)", lambda: (*_no_records(
                _time_hf(target, prompts, cfg, models["draft_vlm"])),)))
    rows, ar_wall, all_records = [], None, []
    for name, job in tqdm(jobs, desc="methods"):
        walls = []
        for _ in range(repeats):
            wall, records, outputs = job()
            walls.append(wall)
        if name == "ar":
            refs[:] = outputs
        wall = statistics.median(walls)
        ar_wall = ar_wall or wall
        rows.append(_row(name, wall, walls, records, outputs, refs, ar_wall))
        all_records += records or []
    return rows, all_records


def _no_records(res: tuple[float, list[list[int]]]) -> tuple[float, None, list[list[int]]]:
    return res[0], None, res[1]


def _row(name: str, wall: float, walls: list[float], records: list[dict] | None,
         outputs: list[list[int]], refs: list[list[int]], ar_wall: float) -> dict:
    tokens = sum(len(o) for o in outputs)
    row: dict[str, Any] = {"method": name, "wall_s": wall, "walls_s": walls, "tokens": tokens,
                           "tokens_per_s": tokens / wall if wall else None,
                           "speedup": ar_wall / wall if wall else None,
                           "mismatches": sum(o != r for o, r in zip(outputs, refs))}
    if records is not None:
        summary = summarize(records)
        row.update(tau=summary.get("tau"), acceptance_rate=summary.get("acceptance_rate"),
                   target_fwd_per_token=summary.get("target_forwards_per_token"))
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
    ap.add_argument("--hf", action="store_true", help="add HF generate and assisted generation")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 avoids oversubscription on a busy small machine)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = load_models(args.family, {r: getattr(args, r) for r in ROLES})
    prompts = shapes_prompts(models["target"], args.items)
    rows, records = run(models, prompts, args.methods, args.max_new_tokens, args.repeats, args.hf,
                        args.alpha)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"family": args.family, "items": args.items, "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats, "machine": machine()}
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = to_markdown(rows, f"{args.family}, {args.items} shapes describe prompts, "
                           f"max {args.max_new_tokens} new tokens, median of {args.repeats}; {meta['machine']}\n")
    (out / "bench.md").write_text(md)
    with (out / "records.jsonl").open("w") as f:  # per-sample stats of the last repeat
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(md)


if __name__ == "__main__":
    main()

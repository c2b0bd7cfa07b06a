"""Speed statistics of one lmms-eval run: per-sample records, their summary, and where they go.

A *record* is a JSON-friendly dict per decoded request (padding duplicates excluded):
  task, doc_id, rank, greedy     where it came from and whether decoding was greedy
  device, threads                the process's torch device and CPU thread count
  stats                          ``GenerationStats.to_dict()`` + ``drafted`` + ``accepted`` +
                                 ``tokens`` (the emitted ids); the trajectory is ``origin``
                                 ("d" draft / "t" target per token) and the per-step lists
  baseline                       the same for the autoregressive run (``baseline=true``) or None
  text_match                     greedy requests with a baseline: SD text == autoregressive text
  mismatch                       where text_match is False: first differing token, both runs'
                                 top-2 logit gaps there, tolerance, kind "tie" or "real"
  measured (optional)            False for requests that only serve the method (calibration
                                 requests of ``*_msd_calibrated``): kept in the JSONL, left out
                                 of the summary and not run again as a baseline

Summary metrics (per task and overall; ``summarize`` is a pure function of the records):
  tokens_per_second          sum of emitted tokens / sum of wall times (prefill + decode)
  tau                        emitted tokens per target decode step, over all steps
                             (= mean accepted length + 1, as MSD and EAGLE report it)
  acceptance_rate            accepted draft tokens / drafted depth, over all steps
  target_forwards_per_token  target forwards (prefill included) / emitted tokens
  speedup                    tokens_per_second / baseline_tokens_per_second (same requests)
  mismatches                 greedy requests whose text differs from the baseline's
  tie_mismatches             ... of which at a numerical tie of the target's top-2 logits
  real_mismatches            ... of which not at a tie: a bug (``mismatch.py``)
Ratios whose denominator is zero are left out rather than reported as 0.

All ranks gather their records (``torch.distributed.all_gather_object``); rank 0 alone calls
lmms-eval's ``log_metrics``, the only calls that reach ``results["throughput"]`` (each key there
gets an ``avg_`` prefix, e.g. ``avg_tau`` and ``avg_<task>/tau``), and writes the JSONL.
"""
from __future__ import annotations

import inspect
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import torch.distributed as dist

from ..core.generate import GenerationResult

Record = dict[str, Any]


def sample_stats(result: GenerationResult) -> dict[str, Any]:
    """One decode's statistics for a record: ``GenerationStats.to_dict()`` + totals + tokens."""
    stats = result.stats
    return {**stats.to_dict(), "drafted": stats.drafted,
            "accepted": sum(s.accepted for s in stats.steps), "tokens": list(result.tokens)}


# ---------------------------------------------------------------------------- summary

def _sums(stats: Iterable[dict]) -> dict[str, float]:
    s: dict[str, float] = defaultdict(float)
    for st in stats:
        s["new_tokens"] += st["new_tokens"]
        s["wall_time"] += st["wall_time"]
        s["decode_steps"] += st["decode_steps"]
        s["accepted"] += st["accepted"]
        s["drafted"] += st["drafted"]
        s["target_forwards"] += st["target_forwards"]
        s["draft_forwards"] += st["draft_forwards"]
    return s


def summarize(records: list[Record]) -> dict[str, float]:
    """Pooled speed metrics of ``records`` (see the module docstring)."""
    s = _sums(r["stats"] for r in records)
    out: dict[str, float] = {"requests": len(records), "new_tokens": int(s["new_tokens"]),
                             "wall_time": s["wall_time"]}
    if s["wall_time"] > 0:
        out["tokens_per_second"] = s["new_tokens"] / s["wall_time"]
    if s["decode_steps"] > 0:
        out["tau"] = (s["accepted"] + s["decode_steps"]) / s["decode_steps"]
    if s["drafted"] > 0:
        out["acceptance_rate"] = s["accepted"] / s["drafted"]
    if s["new_tokens"] > 0:
        out["target_forwards_per_token"] = s["target_forwards"] / s["new_tokens"]
        out["draft_forwards_per_token"] = s["draft_forwards"] / s["new_tokens"]
    paired = [r for r in records if r.get("baseline") is not None]
    if paired and len(paired) == len(records):
        b = _sums(r["baseline"] for r in paired)
        out["baseline_wall_time"] = b["wall_time"]
        if b["wall_time"] > 0:
            out["baseline_tokens_per_second"] = b["new_tokens"] / b["wall_time"]
            if "tokens_per_second" in out and out["baseline_tokens_per_second"] > 0:
                out["speedup"] = out["tokens_per_second"] / out["baseline_tokens_per_second"]
        compared = [r for r in paired if r["text_match"] is not None]
        out["compared"] = len(compared)
        out["mismatches"] = sum(not r["text_match"] for r in compared)
        kinds = [(r.get("mismatch") or {}).get("kind") for r in compared]
        out["tie_mismatches"], out["real_mismatches"] = kinds.count("tie"), kinds.count("real")
    return out


def summarize_by_task(records: list[Record]) -> dict[str, dict[str, float]]:
    """``{"overall": summarize(all), task: summarize(that task's records), ...}``."""
    by_task: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    out = {"overall": summarize(records)}
    out.update({t: summarize(rs) for t, rs in sorted(by_task.items())})
    return out


def flat_metrics(summary: dict[str, dict[str, float]]) -> dict[str, float]:
    """One flat dict for ``log_metrics``: overall keys bare, task keys as ``<task>/<key>``."""
    flat = dict(summary["overall"])
    for task, metrics in summary.items():
        if task != "overall":
            flat.update({f"{task}/{k}": v for k, v in metrics.items()})
    return flat


# ---------------------------------------------------------------------------- gather and report

def gather(records: list[Record]) -> list[Record]:
    """Every rank's records, on every rank, ordered by (task, doc_id, rank)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        buckets: list[list[Record] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(buckets, records)
        records = [r for b in buckets for r in (b or [])]
    return sorted(records, key=lambda r: (r["task"], r["doc_id"], r["rank"]))


def log_speed(records: list[Record], extra_metrics: dict[str, float] | None = None
              ) -> dict[str, dict[str, float]]:
    """Hand the pooled metrics of the measured records (and ``extra_metrics``, e.g. what
    ``tree=auto`` chose) to lmms-eval (call on rank 0 only, with gathered records)."""
    from lmms_eval.models.model_utils.gen_metrics import log_metrics

    measured = [r for r in records if r.get("measured", True)]
    summary = summarize_by_task(measured)
    overall = summary["overall"]
    extra = {k: v for k, v in flat_metrics(summary).items()
             if k not in ("new_tokens", "wall_time", "tokens_per_second")}
    extra["total_requests"] = overall["requests"]
    extra.update(extra_metrics or {})
    if len(measured) < len(records):
        extra["unmeasured_requests"] = len(records) - len(measured)
    log_metrics(total_elapsed_time=overall["wall_time"], total_gen_tokens=overall["new_tokens"],
                avg_speed=overall.get("tokens_per_second", 0.0), additional_metrics=extra)
    return summary


def write_jsonl(path: Path, records: list[Record]) -> None:
    """Append one JSON line per record (one run may call ``generate_until`` more than once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def results_dir_jsonl() -> Path | None:
    """Where lmms-eval will write this run's ``<date>_results.json``, with our file name.

    lmms-eval 0.7.3 gives a model no output path. Its CLI builds an ``EvaluationTracker``
    (``output_path``; ``general_config_tracker.model_name_sanitized`` from ``pretrained=``) and a
    ``datetime_str`` and passes both to ``evaluator.simple_evaluate``, which calls the model;
    results land in ``<output_path>/<model_name_sanitized>/<date>_results.json`` where
    ``<date>`` is ``datetime_str`` with ``-`` for ``:``.
    We read those two locals from the ``simple_evaluate`` frame on our call stack. Returns
    ``<same dir>/<same date>_speed.jsonl``, or None outside such a run or without --output_path.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None and not (frame.f_code.co_name == "simple_evaluate" and
                                         frame.f_globals.get("__name__") == "lmms_eval.evaluator"):
            frame = frame.f_back
        if frame is None:
            return None
        tracker = frame.f_locals.get("evaluation_tracker")
        date = frame.f_locals.get("datetime_str")
    finally:
        del frame  # frames on the stack hold every local: do not keep them alive
    output = getattr(tracker, "output_path", None)
    if not output or not date:
        return None
    name = tracker.general_config_tracker.model_name_sanitized
    return Path(output) / name / f"{str(date).replace(':', '-')}_speed.jsonl"

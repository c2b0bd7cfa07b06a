"""lmms-eval output folders -> leaderboard rows, pooled by raw counts.

What lmms-eval 0.7.3 leaves per run (``--output_path OUT``):
  OUT/<model_name_sanitized>/<date>_results.json   ``results`` (task -> "metric,filter" values),
      ``groups``, ``group_subtasks``, ``configs``, ``versions``, ``n-samples``, ``config``
      (``model``, ``model_args``, ``model_backend``), ``lmms_eval_version``, ``date``,
      ``throughput`` (what our classes gave ``log_metrics``)
  OUT/<model_name_sanitized>/<date>_speed.jsonl    our per-sample records (``speed.py``), every
      rank's, written by rank 0 (or at ``stats_path=``)

A *configuration* is (model class, target, drafter, tree, dtype); a *row* is a configuration and
a task, or ``ALL_TASKS``. Several runs of one configuration are pooled, and so are the ranks
inside a run: speed metrics are ``speed.summarize`` of the concatenated records (sums of tokens,
steps and seconds, then one division), never means of per-run or per-rank means (lmms-eval's
``avg_*`` entries are unweighted means over ``log_metrics`` calls). A task metric is pooled over
runs as the mean weighted by each run's number of documents, which is exact for lmms-eval's
``mean`` aggregation; a metric with another aggregation is not pooled (left empty).
"""
from __future__ import annotations

import importlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..lmms_eval.args import parse_model_args, split_model_args
from ..lmms_eval.speed import Record, summarize
from ..methods import method_class

ALL_TASKS = "all tasks"
OUR_BACKEND = "lmms_sd.lmms_eval.models."
# Issue 16 classifies each greedy mismatch of a record as a numerical tie or a real mismatch.


class ReportError(ValueError):
    """A run folder the report cannot read; the message names the file and the fix."""


@dataclass(frozen=True)
class Config:
    """What a leaderboard compares: the model class and what it was given."""

    model: str    # the lmms-eval model name (``llava_msd``)
    target: str   # ``pretrained=``
    drafter: str  # draft checkpoint(s), "" for none
    tree: str     # tree builder and its settings, "" for none
    dtype: str


@dataclass
class Run:
    """One results JSON and, for our model classes, its speed records."""

    path: Path
    results: dict[str, Any]
    config: Config
    records: list[Record] | None  # None: not one of our model classes (accuracy only)
    device: str
    date: str

    @property
    def version(self) -> str:
        return str(self.results.get("lmms_eval_version", "missing"))


@dataclass(frozen=True)
class Mismatches:
    """Greedy requests whose speculative text differs from the autoregressive one. ``tie`` and
    ``real`` are None when the records do not classify them (runs before issue 16)."""

    total: int
    tie: int | None = None
    real: int | None = None

    @property
    def suspect(self) -> bool:
        """A real mismatch, or one that nobody classified."""
        return self.total > 0 and (self.real is None or self.real > 0)


@dataclass
class Row:
    config: Config
    task: str
    metrics: dict[str, float | None]     # the task's own metrics ({} for ALL_TASKS)
    speed: dict[str, float]              # ``speed.summarize`` of the pooled records ({}: none)
    mismatches: Mismatches | None        # None: no baseline ran
    samples: int                         # documents evaluated (lmms-eval's n-samples)
    runs: int
    device: str
    date: str
    accepted: list[int] = field(default_factory=list)  # accepted draft tokens per verify step


# ---------------------------------------------------------------------------- discovery

def find_results(paths: Sequence[Path]) -> list[Path]:
    """Every ``*_results.json`` under ``paths`` (files or folders, any depth), in the order of
    ``paths`` (sorted inside a folder)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p}: no such file or folder")
        hits = [p] if p.is_file() else sorted(p.rglob("*_results.json"))
        if not hits or not hits[0].name.endswith("_results.json"):
            raise ReportError(f"{p}: no lmms-eval results (*_results.json) at any depth; pass "
                              f"the --output_path of a finished lmms-eval run")
        found.extend(hits)
    return list(dict.fromkeys(found))


def load_runs(paths: Sequence[Path]) -> list[Run]:
    """Every run under ``paths``; all must come from one lmms-eval version."""
    runs = [load_run(p) for p in find_results(paths)]
    check_versions(runs)
    return runs


def check_versions(runs: Sequence[Run]) -> None:
    """Mixed lmms-eval versions (or task versions) make rows incomparable: an error."""
    versions: dict[str, list[Path]] = defaultdict(list)
    for run in runs:
        versions[run.version].append(run.path)
    if len(versions) > 1:
        listing = "; ".join(f"{v}: {', '.join(map(str, ps))}" for v, ps in versions.items())
        raise ReportError(f"runs from different lmms-eval versions ({listing}); report each "
                          f"version's runs separately")
    task_versions: dict[str, dict[Any, Path]] = defaultdict(dict)
    for run in runs:
        for task, v in run.results.get("versions", {}).items():
            task_versions[task].setdefault(v, run.path)
    for task, vs in task_versions.items():
        if len(vs) > 1:
            raise ReportError(f"task {task} has versions {sorted(map(str, vs))} in "
                              f"{', '.join(map(str, vs.values()))}; its rows are not comparable")


# ---------------------------------------------------------------------------- one run

def load_run(path: Path) -> Run:
    """The results JSON at ``path`` and, for our model classes, the speed JSONL of that run."""
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not a readable results JSON ({e})") from None
    if not isinstance(results.get("results"), dict) or "config" not in results:
        raise ReportError(f"{path}: no 'results' and 'config' sections: not an lmms-eval "
                          f"results JSON")
    cfg = results["config"]
    backend = str(cfg.get("model_backend", "")).split(" ")[0]
    args_text = cfg.get("model_args") or ""
    if not isinstance(args_text, str):  # the Python API also takes a dict
        args_text = ",".join(f"{k}={v}" for k, v in args_text.items())
    date = _date(results)
    if not backend.startswith(OUR_BACKEND):
        config = Config(str(cfg.get("model", "?")), str(results.get("model_name", "")), "", "",
                        _lenient_args(args_text).get("dtype", ""))
        return Run(path, results, config, None, str(cfg.get("device") or ""), date)
    cls = _our_class(backend)
    method = method_class(cls.method)  # the class is a family + a method's settings
    try:
        settings, groups = parse_model_args(method.Args, split_model_args(args_text),
                                            method.GROUPS)
    except ValueError as e:
        raise ReportError(f"{path}: its model_args do not fit this lmms_sd's {cls.__name__} "
                          f"({e}); report it with the lmms_sd version that ran it") from None
    records = read_jsonl(speed_path(path, settings.stats_path))
    _check_against_throughput(path, results, records)
    config = Config(str(cfg["model"]), settings.pretrained, _drafter(settings, groups),
                    _tree(settings, groups), settings.dtype)
    return Run(path, results, config, records, _device(records, settings.device), date)


def speed_path(results_path: Path, stats_path: str | None) -> Path:
    """``stats_path=`` if the run set it, else ``<date>_speed.jsonl`` beside the results."""
    if stats_path:
        return Path(stats_path)
    return results_path.with_name(results_path.name.removesuffix("_results.json") + "_speed.jsonl")


def read_jsonl(path: Path) -> list[Record]:
    if not path.is_file():
        raise ReportError(f"{path}: the speed JSONL of this lmms_sd run is missing (it is written "
                          f"beside the results, or at the run's stats_path=); copy it there")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_against_throughput(path: Path, results: dict, records: list[Record]) -> None:
    """The JSONL must be this run's: its measured tokens equal the logged total."""
    logged = results.get("throughput", {}).get("total_gen_tokens")
    ours = sum(r["stats"]["new_tokens"] for r in records if r.get("measured", True))
    if logged is not None and logged != ours:
        raise ReportError(f"{path}: its speed JSONL holds {ours} measured tokens, the results' "
                          f"throughput {logged}; the JSONL belongs to another run (a stats_path "
                          f"shared by several runs?)")


def _our_class(backend: str) -> type:
    module, name = backend.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name, None)
    if cls is None:
        raise ReportError(f"{backend}: no such lmms_sd model class in this version")
    return cls


def _lenient_args(text: str) -> dict[str, str]:
    """Another model class's model_args, when they split like ours (else nothing)."""
    try:
        return split_model_args(text)
    except ValueError:
        return {}


def _drafter(settings: Any, groups: dict[str, dict[str, object]]) -> str:
    if not settings.sd:
        return ""
    drafts = getattr(settings, "drafts", ()) or (getattr(settings, "draft", None) or "",)
    text = " > ".join(map(str, drafts))
    calibrator = groups.get("cal", {}).get("calibrator")
    return f"{text} + {calibrator}" if calibrator else text


def _tree(settings: Any, groups: dict[str, dict[str, object]]) -> str:
    if not settings.sd:
        return ""
    if "cal" in groups:
        name = "calibrated_opt"
        params = {k: v for k, v in groups["cal"].items() if k != "calibrator"}
    else:
        name, params = settings.tree, dict(groups.get("tree", {}))
    if name == "cascade":
        params = {"k_matrix": settings.k_matrix, "lenience": settings.lenience}
    inner = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    return f"{name}({inner})" if inner else name


def _device(records: list[Record], requested: str | None) -> str:
    """The device the records name (``cpu x2``: with 2 threads), else the one requested."""
    seen = sorted({f"{r['device']} x{r['threads']}" if "threads" in r else r["device"]
                   for r in records if "device" in r})
    return ", ".join(seen) or requested or ""


def _date(results: dict) -> str:
    """lmms-eval's ``date`` (``20261203_222318``, local time of its ``--timezone``, by default
    Asia/Singapore in the CLI and in ``simple_evaluate``) in UTC: ``2026-12-03 14:23``."""
    text = str(results.get("date", ""))
    tz = results["config"].get("resolved_cli_args", {}).get("timezone") or "Asia/Singapore"
    try:
        local = datetime.strptime(text, "%Y%m%d_%H%M%S").replace(tzinfo=ZoneInfo(tz))
    except (ValueError, ZoneInfoNotFoundError):
        return text
    return local.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")


# ---------------------------------------------------------------------------- pooling

def leaderboard(runs: Sequence[Run]) -> list[Row]:
    """One row per (configuration, task) and one ``ALL_TASKS`` row per configuration, with every
    run of a configuration pooled; configurations in the order of their first run."""
    by_config: dict[Config, list[Run]] = defaultdict(list)
    for run in runs:
        by_config[run.config].append(run)
    rows: list[Row] = []
    for config, group in by_config.items():
        tasks = sorted({t for run in group for t in run.results["results"]})
        rows.extend(_row(config, group, t) for t in tasks)
        rows.append(_row(config, group, ALL_TASKS))
    return rows


def _row(config: Config, runs: list[Run], task: str) -> Row:
    present = [r for r in runs if task == ALL_TASKS or task in r.results["results"]]
    leaves = {run.path: _leaves(run.results, task) for run in present}
    samples = sum(_n_samples(run.results, t) for run in present for t in leaves[run.path])
    metrics = {} if task == ALL_TASKS else _pooled_metrics(present, task)
    ours = [run for run in present if run.records is not None]
    records = [r for run in ours for r in run.records
               if r["task"] in leaves[run.path] and r.get("measured", True)]
    speed = summarize(records) if records else {}
    return Row(config, task, metrics, speed, mismatch_counts(records) if records else None,
               samples, len(present), ", ".join(sorted({r.device for r in present} - {""})),
               max(r.date for r in present),
               [n for r in records for n in r["stats"].get("accepted_per_step", [])])


def _leaves(results: dict, task: str) -> set[str]:
    """The leaf tasks of ``task`` (itself, a group's subtasks recursively, or every task)."""
    subtasks = results.get("group_subtasks", {})  # leaf tasks map to []
    if task == ALL_TASKS:
        return {t for t in results["results"] if not subtasks.get(t)}
    if not subtasks.get(task):
        return {task}
    return set().union(*(_leaves(results, t) for t in subtasks[task]))


def _n_samples(results: dict, task: str) -> int:
    n = results.get("n-samples", {}).get(task, {})
    return int(n.get("effective", n.get("original", 0)))


def _pooled_metrics(runs: list[Run], task: str) -> dict[str, float | None]:
    """The task's metrics; over several runs, means weighted by the runs' documents."""
    values: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for run in runs:
        n = sum(_n_samples(run.results, t) for t in _leaves(run.results, task))
        for name, v in task_metrics(run.results["results"][task]).items():
            values[name].append((v, n))
    out: dict[str, float | None] = {}
    for name, vs in values.items():
        total = sum(n for _, n in vs)
        if len(vs) == 1:
            out[name] = vs[0][0]
        elif total > 0 and all(_mean_aggregated(run.results, task, name) for run in runs):
            out[name] = sum(v * n for v, n in vs) / total
        else:
            out[name] = None
    return out


def task_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """``{"content_acc,none": 0.8, "content_acc_stderr,none": ..}`` -> ``{"content_acc": 0.8}``
    (a filter other than ``none`` is kept in parentheses)."""
    out: dict[str, float] = {}
    for key, v in entry.items():
        metric, _, filt = key.partition(",")
        if "_stderr" in metric or key == "alias" or isinstance(v, bool) \
                or not isinstance(v, (int, float)):
            continue
        out[metric if filt in ("", "none") else f"{metric} ({filt})"] = float(v)
    return out


def _mean_aggregated(results: dict, task: str, metric: str) -> bool:
    """A leaf task's metric aggregated by ``mean`` (groups: mean over their documents)."""
    name = metric.split(" (")[0]
    cfg = results.get("configs", {}).get(task)
    if cfg is None:
        return bool(results.get("group_subtasks", {}).get(task))
    return any(m.get("metric") == name and m.get("aggregation") == "mean"
               for m in cfg.get("metric_list", []))


def mismatch_counts(records: Iterable[Record]) -> Mismatches | None:
    """Greedy text mismatches against the baseline, split into ties and real ones when every
    mismatching record says which (its ``mismatch`` diagnosis, ``lmms_eval/mismatch.py``:
    ``{"kind": "tie" | "real", ...}``). None when nothing was compared."""
    compared = [r for r in records if r.get("text_match") is not None]
    if not compared:
        return None
    kinds = [(r.get("mismatch") or {}).get("kind") for r in compared if not r["text_match"]]
    if None in kinds:
        return Mismatches(len(kinds))
    return Mismatches(len(kinds), kinds.count("tie"), kinds.count("real"))

"""Leaderboard rows -> Markdown and CSV (the same columns; Markdown rounds and shortens paths).

A configuration with a real greedy mismatch (or an unclassified one) is marked ``!`` on every
row: its speculative output was not the target's own, so its speed is not a lossless speed.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any, Sequence

from .load import ALL_TASKS, Mismatches, Row

SPEED_COLUMNS = (("tau", "tau"), ("acceptance_rate", "acceptance"),
                 ("tokens_per_second", "tokens/s"), ("baseline_tokens_per_second", "AR tokens/s"),
                 ("speedup", "speedup"))
CSV_EXTRA = ("requests", "target_forwards_per_token", "draft_forwards_per_token", "wall_time",
             "baseline_wall_time")
MARK = "!"
FOOTNOTE = (f"{MARK}: greedy output differed from autoregressive decoding beyond numerical ties "
            f"(or the run did not classify its mismatches): not a lossless configuration")


def metric_names(rows: Sequence[Row]) -> list[str]:
    """Every task metric in ``rows``, in order of first appearance."""
    return list(dict.fromkeys(name for row in rows for name in row.metrics))


def suspect_configs(rows: Sequence[Row]) -> set:
    return {r.config for r in rows if r.task == ALL_TASKS and r.mismatches is not None
            and r.mismatches.suspect}


def table(rows: Sequence[Row], short: bool) -> tuple[list[str], list[list[Any]]]:
    """The header and one list of cells per row (``short``: rounded, paths shortened, ``-`` for
    an empty cell, ``!`` before the model of a suspect configuration)."""
    metrics = metric_names(rows)
    header = ["model", "target", "drafter", "tree", "dtype", "task", *metrics,
              *(title for _, title in SPEED_COLUMNS), "mismatches (tie/real)", "samples",
              "runs", "device", "date (UTC)"]
    if not short:
        header += list(CSV_EXTRA)
    marked = suspect_configs(rows)
    cells = []
    for row in rows:
        c = row.config
        mark = f"{MARK} " if short and c in marked else ""
        line = [mark + c.model, *(short_paths(p) if short else p for p in (c.target, c.drafter)),
                c.tree, c.dtype, row.task, *(_num(row.metrics.get(m), short) for m in metrics),
                *(_num(row.speed.get(key), short) for key, _ in SPEED_COLUMNS),
                _mismatches(row.mismatches), row.samples, row.runs, row.device, row.date]
        if not short:
            line += [_num(row.speed.get(key), False) for key in CSV_EXTRA]
        cells.append([v if v != "" or not short else "-" for v in line])
    return header, cells


def to_markdown(rows: Sequence[Row]) -> str:
    header, cells = table(rows, short=True)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in line) + " |" for line in cells]
    if suspect_configs(rows):
        lines += ["", FOOTNOTE]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Row], path: Path) -> None:
    header, cells = table(rows, short=False)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(cells)


def _num(v: float | None, short: bool) -> str | float:
    if v is None:
        return ""
    return f"{v:.3g}" if short and isinstance(v, float) else v


def _mismatches(m: Mismatches | None) -> str:
    if m is None:
        return ""
    if m.tie is None:
        return str(m.total)
    return f"{m.tie}/{m.real}"


def short_paths(text: str) -> str:
    """The last two parts of each path in ``text`` (``.../shapes/llava/target`` ->
    ``llava/target``)."""
    return re.sub(r"\S*/\S*", lambda m: "/".join(Path(m.group()).parts[-2:]), text)

"""``lmms-sd report RUN_DIR... --out DIR``: a leaderboard of accuracy and speed from lmms-eval runs.

Reads every lmms-eval results JSON under the given folders (any depth) and, for lmms_sd's model
classes, the per-sample speed JSONL beside it; writes ``leaderboard.md``, ``leaderboard.csv`` and
the pictures of ``plots.py``, and prints the Markdown table. One row per (model class, target,
drafter, tree, dtype, task) plus an ``all tasks`` row per configuration; runs of one
configuration and the ranks of a run are pooled by raw counts (``load.py``). Other model classes
get accuracy-only rows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .load import ALL_TASKS, Config, ReportError, Row, leaderboard, load_runs
from .table import to_markdown, write_csv

__all__ = ["ALL_TASKS", "Config", "ReportError", "Row", "leaderboard", "load_runs", "report",
           "main"]


def report(paths: Sequence[Path], out: Path) -> list[Row]:
    """Read the runs under ``paths``, write the leaderboard files to ``out``, return its rows."""
    from .plots import write_plots  # matplotlib only when writing

    runs = load_runs(paths)
    for run in runs:
        if run.records is None:
            print(f"note: {run.path} is from {run.config.model}, not an lmms_sd model class: "
                  f"accuracy only", file=sys.stderr)
    rows = leaderboard(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaderboard.md").write_text(to_markdown(rows), encoding="utf-8")
    write_csv(rows, out / "leaderboard.csv")
    write_plots(rows, out)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lmms-sd report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="lmms-eval --output_path folders or "
                    "*_results.json files")
    ap.add_argument("--out", type=Path, required=True, help="where the leaderboard files go")
    args = ap.parse_args(argv)
    try:
        rows = report(args.runs, args.out)
    except ReportError as e:
        print(f"lmms-sd report: {e}", file=sys.stderr)
        return 2
    print(to_markdown(rows))
    print(f"wrote {args.out / 'leaderboard.md'}, leaderboard.csv and *.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

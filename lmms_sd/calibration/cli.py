"""Fit and evaluate acceptance calibrators from trace files.

  python -m lmms_sd.calibration.cli fit --traces T.jsonl [T2.jsonl ...] --out C.json \\
      [--label soft|hard|target_prob] [--min-samples 200] [--attention-buckets 5] \\
      [--finer depth margin] [--depth-edges 2] [--margin-buckets 3] [--holdout 0.2] \\
      [--plot reliability.png]
  python -m lmms_sd.calibration.cli evaluate --calibrator C.json --traces T.jsonl [--plot P.png]

``fit`` fits on the first (1 - holdout) fraction of the records, in file order (as the thesis's
``train_ratio`` uses the first requests of a task), reports ECE and Brier before and after
calibration on the rest, and saves the calibrator. With ``--holdout 0`` it fits on everything and
the report is in-sample. The tokenizer fingerprint comes from the trace files' header.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .calibrator import FINER_DIMS, CalibratorConfig, GroupedIsotonicCalibrator
from .metrics import calibration_report
from .plots import plot_reliability
from .traces import LABELS, TraceColumns, read_traces


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lmms_sd.calibration.cli", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit a grouped isotonic calibrator")
    fit.add_argument("--traces", nargs="+", required=True, type=Path)
    fit.add_argument("--out", required=True, type=Path)
    fit.add_argument("--label", choices=LABELS, default="soft")
    fit.add_argument("--min-samples", type=int, default=200)
    fit.add_argument("--attention-buckets", type=int, default=5)
    fit.add_argument("--finer", nargs="*", choices=FINER_DIMS, default=[])
    fit.add_argument("--depth-edges", nargs="*", type=int, default=[2])
    fit.add_argument("--margin-buckets", type=int, default=3)
    fit.add_argument("--holdout", type=float, default=0.2)
    fit.add_argument("--bins", type=int, default=10)
    fit.add_argument("--plot", type=Path)
    ev = sub.add_parser("evaluate", help="ECE and Brier of a saved calibrator on traces")
    ev.add_argument("--calibrator", required=True, type=Path)
    ev.add_argument("--traces", nargs="+", required=True, type=Path)
    ev.add_argument("--bins", type=int, default=10)
    ev.add_argument("--plot", type=Path)
    return ap


def _report(cal: GroupedIsotonicCalibrator, cols: TraceColumns, bins: int, plot: Path | None,
            what: str) -> None:
    label = cols.label(cal.label)
    calibrated = cal.predict(cols.features)
    rep = calibration_report(cols.features.confidence, calibrated, label, bins)
    print(f"[{what}, label={cal.label}] " + "; ".join(rep.lines()))
    if plot is not None:
        plot_reliability(plot, cols.features.confidence, calibrated, label, bins,
                         title=f"Draft acceptance ({what}, label={cal.label})")
        print(f"reliability diagram: {plot}")


def _fit(args: argparse.Namespace) -> int:
    if not 0.0 <= args.holdout < 1.0:
        raise ValueError(f"--holdout must be in [0, 1), got {args.holdout}")
    fingerprint, records = read_traces(args.traces, progress=True)
    n_fit = len(records) - round(len(records) * args.holdout)
    if n_fit < 1:
        raise ValueError(f"{len(records)} records leave nothing to fit with "
                         f"--holdout {args.holdout}")
    config = CalibratorConfig(args.attention_buckets, args.min_samples, tuple(args.finer),
                              tuple(args.depth_edges), args.margin_buckets)
    train = TraceColumns.stack(records[:n_fit])
    cal = GroupedIsotonicCalibrator.fit(train.features, train.label(args.label), fingerprint,
                                        config, args.label, progress=True)
    cal.save(args.out)
    print(f"fitted {len(cal.curves)} curves (incl. global) of {len(cal.group_counts)} groups "
          f"on {n_fit} records -> {args.out}")
    held = records[n_fit:]
    cols, what = (TraceColumns.stack(held), "held-out") if held else (train, "in-sample")
    _report(cal, cols, args.bins, args.plot, what)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    fingerprint, records = read_traces(args.traces, progress=True)
    cal = GroupedIsotonicCalibrator.load(args.calibrator, fingerprint)
    _report(cal, TraceColumns.stack(records), args.bins, args.plot, "evaluate")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return _fit(args) if args.command == "fit" else _evaluate(args)


if __name__ == "__main__":
    sys.exit(main())

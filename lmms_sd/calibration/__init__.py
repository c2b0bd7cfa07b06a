"""Acceptance calibrators: draft confidence -> probability that the target accepts a candidate.

features.py    per-candidate features (confidence, token category, image attention, depth, margin)
traces.py      labelled records from verified trees, JSONL I/O
calibrator.py  grouped isotonic calibrator with fallback, JSON save/load
metrics.py     ECE and Brier score
plots.py       reliability diagram
cli.py         ``python -m lmms_sd.calibration.cli fit|evaluate``
recording.py   draft rows and image attention per slot of a step (TracingDrafter), trace observer
steering.py    the Calibrated OPT-Tree: calibrated acceptance as OPT-Tree's score
online.py      CalibratedSettings, CalibrationSession (train_ratio / calibrator=PATH),
               ``make_calibrated`` (what the lmms-eval layer calls)
collect.py     ``python -m lmms_sd.calibration.collect``: traces from shapes prompts
compare.py     ``python -m lmms_sd.calibration.compare``: tau, calibrated vs plain OPT-Tree
"""
from .calibrator import (CalibratorConfig, GroupedIsotonicCalibrator, IsotonicCurve,
                         vocab_fingerprint)
from .features import (CATEGORIES, CandidateFeatures, FeatureArrays, category_table,
                       image_attention_mass, token_category)
from .metrics import brier_score, calibration_report, expected_calibration_error
from .online import CalibratedSettings, CalibrationSession, RequestPhase, make_calibrated
from .traces import TraceColumns, TraceRecord, read_traces, records_from_tree, write_traces

__all__ = [
    "CATEGORIES", "CalibratedSettings", "CalibrationSession", "CalibratorConfig",
    "CandidateFeatures", "FeatureArrays", "GroupedIsotonicCalibrator", "IsotonicCurve",
    "RequestPhase", "TraceColumns", "TraceRecord", "brier_score", "calibration_report",
    "category_table", "expected_calibration_error", "image_attention_mass", "make_calibrated",
    "read_traces", "records_from_tree", "token_category", "vocab_fingerprint", "write_traces",
]

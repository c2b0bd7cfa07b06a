"""Acceptance calibrators: draft confidence -> probability that the target accepts a candidate.

features.py    per-candidate features (confidence, token category, image attention, depth, margin)
traces.py      labelled records from verified trees, JSONL I/O
calibrator.py  grouped isotonic calibrator with fallback, JSON save/load
metrics.py     ECE and Brier score
plots.py       reliability diagram
cli.py         ``python -m lmms_sd.calibration.cli fit|evaluate``
"""
from .calibrator import (CalibratorConfig, GroupedIsotonicCalibrator, IsotonicCurve,
                         vocab_fingerprint)
from .features import (CATEGORIES, CandidateFeatures, FeatureArrays, category_table,
                       image_attention_mass, token_category)
from .metrics import brier_score, calibration_report, expected_calibration_error
from .traces import TraceColumns, TraceRecord, read_traces, records_from_tree, write_traces

__all__ = [
    "CATEGORIES", "CalibratorConfig", "CandidateFeatures", "FeatureArrays",
    "GroupedIsotonicCalibrator", "IsotonicCurve", "TraceColumns", "TraceRecord", "brier_score",
    "calibration_report", "category_table", "expected_calibration_error", "image_attention_mass",
    "read_traces", "records_from_tree", "token_category", "vocab_fingerprint", "write_traces",
]

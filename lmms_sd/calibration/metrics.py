"""How well a probability predicts acceptance: expected calibration error and Brier score.

Labels may be hard (0/1 acceptance) or soft (acceptance probabilities); both metrics compare a
prediction with the label's mean, so they read the same way for either.

ECE     sum over equal-width bins of |bin| / n * |mean prediction - mean label| in the bin;
        bin b covers [b/B, (b+1)/B), the last bin also holds 1.0.
Brier   mean (prediction - label)^2.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of equal-width bins over [0, 1], each # [B] (NaN means for empty bins).

    edges # [B+1]; count; mean_pred; mean_label."""

    edges: np.ndarray
    count: np.ndarray
    mean_pred: np.ndarray
    mean_label: np.ndarray


def _check(pred: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, label = np.asarray(pred, dtype=np.float64), np.asarray(label, dtype=np.float64)
    if pred.ndim != 1 or pred.shape != label.shape or len(pred) == 0:
        raise ValueError(f"need equal non-empty 1-D predictions and labels, got {pred.shape} "
                         f"and {label.shape}")
    return pred, label


def reliability_bins(pred: np.ndarray, label: np.ndarray, n_bins: int = 10) -> ReliabilityBins:
    """pred, label: # [n] in [0, 1]."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    pred, label = _check(pred, label)
    idx = np.clip((pred * n_bins).astype(np.int64), 0, n_bins - 1)  # [n]
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.bincount(idx, pred, minlength=n_bins) / count
        mean_label = np.bincount(idx, label, minlength=n_bins) / count
    return ReliabilityBins(np.linspace(0.0, 1.0, n_bins + 1), count, mean_pred, mean_label)


def expected_calibration_error(pred: np.ndarray, label: np.ndarray, n_bins: int = 10) -> float:
    bins = reliability_bins(pred, label, n_bins)
    full = bins.count > 0
    gaps = np.abs(bins.mean_pred[full] - bins.mean_label[full])
    return float((bins.count[full] * gaps).sum() / bins.count.sum())


def brier_score(pred: np.ndarray, label: np.ndarray) -> float:
    pred, label = _check(pred, label)
    return float(np.mean((pred - label) ** 2))


@dataclass(frozen=True)
class CalibrationReport:
    """ECE and Brier of raw draft confidence (before) and of calibrated probability (after)."""

    n: int
    ece_before: float
    ece_after: float
    brier_before: float
    brier_after: float

    def lines(self) -> list[str]:
        return [f"n={self.n}",
                f"ECE   raw {self.ece_before:.4f} -> calibrated {self.ece_after:.4f}",
                f"Brier raw {self.brier_before:.4f} -> calibrated {self.brier_after:.4f}"]


def calibration_report(confidence: np.ndarray, calibrated: np.ndarray, label: np.ndarray,
                       n_bins: int = 10) -> CalibrationReport:
    """confidence, calibrated, label: # [n]."""
    return CalibrationReport(
        n=len(label),
        ece_before=expected_calibration_error(confidence, label, n_bins),
        ece_after=expected_calibration_error(calibrated, label, n_bins),
        brier_before=brier_score(confidence, label),
        brier_after=brier_score(calibrated, label),
    )

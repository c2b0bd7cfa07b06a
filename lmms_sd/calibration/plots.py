"""Reliability diagram of raw draft confidence against calibrated acceptance probability.

Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works on
headless machines and leaves the caller's matplotlib state alone.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import expected_calibration_error, reliability_bins


def plot_reliability(path: str | Path, confidence: np.ndarray, calibrated: np.ndarray,
                     label: np.ndarray, n_bins: int = 10, title: str = "Draft acceptance") -> Path:
    """Write a PNG: mean label against mean prediction per equal-width bin (top) and the number
    of candidates per bin (bottom), for raw confidence and calibrated probability.

    confidence, calibrated, label: # [n]
    """
    fig = Figure(figsize=(5.5, 6.5))
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="ideal")
    width = 1.0 / n_bins
    for i, (name, pred) in enumerate((("raw confidence", confidence),
                                      ("calibrated", calibrated))):
        bins = reliability_bins(pred, label, n_bins)
        full = bins.count > 0
        ece = expected_calibration_error(pred, label, n_bins)
        top.plot(bins.mean_pred[full], bins.mean_label[full], marker="o",
                 label=f"{name} (ECE {ece:.3f})")
        bottom.bar(bins.edges[:-1] + width * (0.25 + 0.5 * i), bins.count, width=width / 2,
                   label=name)
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="mean acceptance", title=title)
    top.legend(loc="upper left")
    bottom.set(xlabel="predicted acceptance probability", ylabel="candidates")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path

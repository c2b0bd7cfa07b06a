"""Leaderboard pictures (matplotlib's Agg canvas, no display needed):

  accuracy_vs_speedup.png   per task, each configuration's first task metric against its speedup
  tau_per_task.png          tau per task (and over all tasks), one bar per configuration
  accepted_lengths.png      accepted draft tokens per verify step, share of steps, per
                            configuration over all its tasks (``bench.plots``' histogram)
A picture with nothing to show (accuracy-only runs, no baseline) says so instead.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..bench.plots import plot_accept_length_hist
from .load import ALL_TASKS, Config, Row
from .table import short_paths


def config_labels(configs: Sequence[Config]) -> dict[Config, str]:
    """Short names made of the fields in which the configurations differ."""
    varying = [f.name for f in fields(Config) if len({getattr(c, f.name) for c in configs}) > 1]
    names = varying or ["model", "tree"]
    return {c: " ".join(short_paths(str(getattr(c, n))) if n in ("target", "drafter")
                        else str(getattr(c, n) or "-") for n in names) for c in configs}


def write_plots(rows: Sequence[Row], out: Path) -> list[Path]:
    labels = config_labels(list(dict.fromkeys(r.config for r in rows)))
    return [plot_accuracy_vs_speedup(rows, labels, out / "accuracy_vs_speedup.png"),
            plot_tau(rows, labels, out / "tau_per_task.png"),
            plot_accepted_lengths(rows, labels, out / "accepted_lengths.png")]


def plot_accuracy_vs_speedup(rows: Sequence[Row], labels: dict[Config, str], path: Path) -> Path:
    points = [r for r in rows if r.task != ALL_TASKS and "speedup" in r.speed
              and any(v is not None for v in r.metrics.values())]
    tasks = sorted({r.task for r in points})
    if not tasks:
        return _empty(path, "no task has both a metric and a speedup (baseline=true)")
    colour = {c: f"C{i % 10}" for i, c in enumerate(labels)}
    fig = _figure(len(tasks), max(4.2, 6.0 / len(tasks)), 3.6)
    for ax, task in zip(fig.subplots(1, len(tasks), squeeze=False)[0], tasks):
        for r in (r for r in points if r.task == task):
            metric, value = next((m, v) for m, v in r.metrics.items() if v is not None)
            ax.scatter(r.speed["speedup"], value, label=labels[r.config], color=colour[r.config])
            ax.set_ylabel(metric)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set(title=task, xlabel="speedup over autoregressive")
    _legend_below(fig.axes[0])
    return _save(fig, path)


def plot_tau(rows: Sequence[Row], labels: dict[Config, str], path: Path) -> Path:
    bars = [r for r in rows if "tau" in r.speed]
    if not bars:
        return _empty(path, "no speed records (only lmms_sd model classes write them)")
    tasks = sorted({r.task for r in bars} - {ALL_TASKS}) + [ALL_TASKS]
    configs = list(dict.fromkeys(r.config for r in bars))
    tau = {(r.config, r.task): r.speed["tau"] for r in bars}
    x, width = np.arange(len(tasks)), 0.8 / len(configs)
    fig = _figure(1, max(5.0, 1.2 * len(tasks) * max(1, len(configs) / 3)), 4.0)
    ax = fig.subplots()
    for i, c in enumerate(configs):
        ax.bar(x - 0.4 + width * (i + 0.5), [tau.get((c, t), 0.0) for t in tasks], width,
               label=labels[c])
    ax.set(xticks=x, xticklabels=tasks, ylabel="tau (tokens per target step)",
           title="tau per task")
    _legend_below(ax)
    return _save(fig, path)


def plot_accepted_lengths(rows: Sequence[Row], labels: dict[Config, str], path: Path) -> Path:
    lengths = {labels[r.config]: Counter(r.accepted) for r in rows
               if r.task == ALL_TASKS and r.accepted and r.config.drafter}
    if not lengths:
        return _empty(path, "no drafting steps in the speed records")
    return plot_accept_length_hist(path, lengths)


def _figure(panels: int, width: float, height: float) -> Figure:
    fig = Figure(figsize=(width * panels, height))
    FigureCanvasAgg(fig)
    return fig


def _legend_below(ax: Axes) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.25), frameon=False)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight" keeps the legend below the axes
    return path


def _empty(path: Path, text: str) -> Path:
    fig = _figure(1, 5.0, 1.5)
    fig.text(0.5, 0.5, text, ha="center", va="center")
    fig.savefig(path, dpi=110)
    return path

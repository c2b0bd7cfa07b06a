"""Steering OPT-Tree with calibrated acceptance probabilities: the "Calibrated OPT-Tree".

OPT-Tree (``trees/opt.py``) weights a path by the product of its nodes' scores, keeps the global
top ``nodes`` weights, and stops adding layers when E[A] (the sum of kept weights) grows by less
than ``threshold``. With the draft probability as the score, E[A] is the draft's own belief.
``CalibratedScore`` replaces the score of a child y of slot s with the calibrator's estimate of
P(target accepts y | s accepted), from y's features (draft confidence, token category, the
draft's image attention at s, depth, the margin of q_s). A path weight is then the calibrated
probability that the whole path is accepted, E[A] the calibrated expected number of accepted
tokens, and the early stop compares a new layer's gain in it with ``threshold`` (the thesis uses
0.2, OPT-Tree 0.5 on raw probabilities).

Lossless: the score only decides which tokens are proposed; verification is unchanged.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..core.interfaces import Drafter
from ..core.sampling import SamplingConfig
from ..core.tree import DraftTree
from ..trees.opt import ChildCandidates, OptBuilder, OptConfig
from .calibrator import GroupedIsotonicCalibrator
from .recording import TracingDrafter


class CalibratedScore:
    """An OPT-Tree ``score_fn``: calibrated acceptance of each candidate child.

    categories: # [V] category id per token id (``category_table``)
    drafter:    the tracing drafter the tree is built over (for each parent's image attention)
    A child the draft gives probability 0 scores 0: it must never be proposed.
    """

    def __init__(self, calibrator: GroupedIsotonicCalibrator, categories: np.ndarray,
                 drafter: TracingDrafter) -> None:
        self.calibrator, self.categories, self.drafter = calibrator, categories, drafter

    def __call__(self, c: ChildCandidates) -> Tensor:  # [m, c]
        attention = self.drafter.attention(c.frontier)  # [m]
        s = self.calibrator.predict_children(c.probs, c.tokens, c.dists, c.depth,
                                             self.categories, attention)
        return torch.where(c.probs > 0, s, torch.zeros_like(s))


class SteeredOptBuilder:
    """OPT-Tree over one ``TracingDrafter`` whose scorer can be switched: the draft probability
    under ``plain`` settings while no calibrator is set, calibrated acceptance under ``steered``
    settings after ``steer(calibrator)``. Both use the same node budget when the settings do."""

    def __init__(self, drafter: TracingDrafter, categories: np.ndarray, plain: OptConfig,
                 steered: OptConfig,
                 calibrator: GroupedIsotonicCalibrator | None = None) -> None:
        self.drafter, self.categories = drafter, categories
        self.plain = OptBuilder(plain)
        self.steered_cfg = steered
        self._builder = self.plain
        self.calibrator: GroupedIsotonicCalibrator | None = None
        self.steer(calibrator)

    def steer(self, calibrator: GroupedIsotonicCalibrator | None) -> None:
        """Use ``calibrator`` from the next tree on (None: back to the plain OPT-Tree)."""
        self.calibrator = calibrator
        self._builder = self.plain if calibrator is None else OptBuilder(
            self.steered_cfg, CalibratedScore(calibrator, self.categories, self.drafter))

    @property
    def calibrated(self) -> bool:
        return self.calibrator is not None

    def __call__(self, drafter: Drafter, sampling: SamplingConfig,
                 generator: torch.Generator | None = None) -> DraftTree:
        if drafter is not self.drafter:
            raise ValueError(f"this builder steers trees of its own tracing drafter "
                             f"({self.drafter.name!r}); generate() was given "
                             f"{getattr(drafter, 'name', type(drafter).__name__)!r}")
        return self._builder(drafter, sampling, generator)

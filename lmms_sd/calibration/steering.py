"""Steering OPT-Tree with calibrated acceptance probabilities: the "Calibrated OPT-Tree".

OPT-Tree (``trees/opt.py``) weights a path by the product of its nodes' scores, keeps the global
top weights, and stops adding layers when E[A] (the sum of kept weights) grows by less than
``threshold``. With the draft probability as the score, E[A] is the draft's own belief. The
calibrator estimates p_hat = P(target accepts y | s accepted) for a child y of slot s from y's
features (draft confidence, token category, the draft's image attention at s, depth, the margin
of q_s). Two ways to use it (``STEERINGS``):

``thesis`` (``ThesisScore``, the modality-aware thesis's ``cnets.py::topK_genrate``): bias the
    draft logits of the top_k preselected children, z_y + alpha_y * clip(logit(p_hat_y), -3, 3)
    with p_hat clipped to [1e-3, 1 - 1e-3], re-apply the softmax over the whole vocabulary, and
    score each child by its corrected probability. alpha_y is ``adaptive_alpha``.
``replace`` (``CalibratedScore``): the score is p_hat itself. A path weight is then the
    calibrated probability that the whole path is accepted, E[A] the calibrated expected number
    of accepted tokens.

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
from .features import NUMBER, draft_margin
from .recording import TracingDrafter


STEERINGS = ("thesis", "replace")
LOGIT_CLIP = 3.0      # MAX_CALIB_LOGIT
PROB_FLOOR = 1e-3     # PROB_FLOOR
NUMBER_BOOST = 1.4    # tok_boost of number tokens
ALPHA_RANGE = (0.2, 0.8)


def _percentile_norm(x: np.ndarray) -> np.ndarray:  # [n] -> [n] in [0, 1]
    """(x - p10) / (p90 - p10), clipped; min/max when the 10-90 range is empty (the thesis)."""
    lo, hi = np.percentile(x, 10), np.percentile(x, 90)
    if hi <= lo:
        lo, hi = float(x.min()), float(x.max()) + 1e-8
    return np.clip((x - lo) / (hi - lo + 1e-8), 0.0, 1.0)


def adaptive_alpha(margin: np.ndarray, depth: int, attention: np.ndarray,
                   is_number: np.ndarray, base_alpha: float = 1.0) -> np.ndarray:  # [n]
    """The thesis's per-candidate bias weight (``_compute_adaptive_alpha``), over one layer's n
    candidates: more weight on the calibrator where the draft is unsure (small margin), deep,
    or looks little at the image, and 1.4x for number tokens:
    base_alpha * clip(clip((0.2 m + 0.4 d + 0.4 a) * boost, 0, 1.2), 0.2, 0.8) with
    m = 1 - norm(margin), d = clip(depth / 6, 0, 1), a = 1 - norm(attention) and norm the
    10th-90th percentile scaling over the layer (``_percentile_norm``).

    margin, attention: # [n] float per candidate (its parent's); is_number: # [n] bool
    """
    m = 1.0 - _percentile_norm(np.asarray(margin, dtype=np.float64))
    a = 1.0 - _percentile_norm(np.asarray(attention, dtype=np.float64))
    d = min(max(depth / 6.0, 0.0), 1.0)
    boost = np.where(np.asarray(is_number, dtype=bool), NUMBER_BOOST, 1.0)
    combo = np.clip((0.2 * m + 0.4 * d + 0.4 * a) * boost, 0.0, 1.2)
    return base_alpha * np.clip(combo, *ALPHA_RANGE)


def biased_child_probs(probs: Tensor, bias: Tensor) -> Tensor:  # [m, c]
    """softmax(z + bias on the c preselected children) at those children, from the draft
    probabilities alone: q_y e^{b_y} / (1 - sum_c q + sum_c q e^{b}).

    probs: # [m, c] the draft distribution q at the children; bias: # [m, c]
    """
    boosted = probs * bias.exp()
    rest = (1.0 - probs.sum(-1, keepdim=True)).clamp(min=0.0)
    return boosted / (rest + boosted.sum(-1, keepdim=True))


class ThesisScore:
    """An OPT-Tree ``score_fn``: the thesis's calibrated logit bias (module docstring).

    categories: # [V] category id per token id (``category_table``)
    drafter:    the tracing drafter the tree is built over (for each parent's image attention)
    """

    def __init__(self, calibrator: GroupedIsotonicCalibrator, categories: np.ndarray,
                 drafter: TracingDrafter, base_alpha: float = 1.0) -> None:
        self.calibrator, self.categories, self.drafter = calibrator, categories, drafter
        self.base_alpha = base_alpha

    def __call__(self, c: ChildCandidates) -> Tensor:  # [m, c]
        m, k = c.probs.shape
        attention = self.drafter.attention(c.frontier)  # [m]
        p_hat = self.calibrator.predict_children(c.probs, c.tokens, c.dists, c.depth,
                                                 self.categories, attention)
        p_hat = p_hat.double().clamp(PROB_FLOOR, 1.0 - PROB_FLOOR)
        logit = torch.logit(p_hat).clamp(-LOGIT_CLIP, LOGIT_CLIP)
        per_parent = lambda x: np.repeat(np.asarray(x, dtype=np.float64), k)  # [m] -> [m * k]
        category = np.asarray(self.categories)[c.tokens.detach().cpu().numpy().reshape(-1)]
        alpha = adaptive_alpha(per_parent(draft_margin(c.dists.detach()).cpu()), c.depth,
                               per_parent(attention.cpu()), category == NUMBER, self.base_alpha)
        bias = torch.from_numpy(alpha).reshape(m, k).to(logit) * logit.to(c.probs.device)
        s = biased_child_probs(c.probs.double(), bias).to(c.probs.dtype)
        return torch.where(c.probs > 0, s, torch.zeros_like(s))


class CalibratedScore:
    """An OPT-Tree ``score_fn``: calibrated acceptance of each candidate child (``replace``).

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
    under ``plain`` settings while no calibrator is set, the calibrated score of ``steering``
    (``STEERINGS``) under ``steered`` settings after ``steer(calibrator)``. Both use the same
    node budget when the settings do."""

    def __init__(self, drafter: TracingDrafter, categories: np.ndarray, plain: OptConfig,
                 steered: OptConfig,
                 calibrator: GroupedIsotonicCalibrator | None = None,
                 steering: str = "thesis", base_alpha: float = 1.0) -> None:
        if steering not in STEERINGS:
            raise ValueError(f"steering must be one of {STEERINGS}, got {steering!r}")
        self.drafter, self.categories = drafter, categories
        self.steering, self.base_alpha = steering, base_alpha
        self.plain = OptBuilder(plain)
        self.steered_cfg = steered
        self._builder = self.plain
        self.calibrator: GroupedIsotonicCalibrator | None = None
        self.steer(calibrator)

    def steer(self, calibrator: GroupedIsotonicCalibrator | None) -> None:
        """Use ``calibrator`` from the next tree on (None: back to the plain OPT-Tree)."""
        self.calibrator = calibrator
        if calibrator is None:
            self._builder = self.plain
        elif self.steering == "thesis":
            self._builder = OptBuilder(self.steered_cfg, ThesisScore(
                calibrator, self.categories, self.drafter, self.base_alpha))
        else:
            self._builder = OptBuilder(self.steered_cfg,
                                       CalibratedScore(calibrator, self.categories, self.drafter))

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

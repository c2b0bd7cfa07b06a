"""Diagnosis of greedy mismatches between speculative and autoregressive decoding (``baseline=true``).

Greedy speculative decoding emits the target's argmax at every position, like autoregressive
decoding, but the two compute the target's logits in different shapes (a tree or chain of
several tokens per forward vs one token): in exact arithmetic they agree, in floating point
they differ by rounding. Where the target's two best logits are that close, the argmax may flip.

``GapRecorder`` (a ``generate`` observer) records, for every token a run emits after the first,
the gap between the target's two largest logits in the row that chose it. At the first position
where the two runs' tokens differ, the mismatch is a *tie* when either run's gap there is
within ``tie_tolerance(dtype, top logit)``, else *real* (a bug: ``base.py`` logs an error).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..core.tree import DraftTree
from ..core.verify import Verdict

TIE_EPS = 4  # a top-2 gap up to this many machine epsilons (relative) counts as a tie


class GapRecorder:
    """Observer of ``generate``: ``gaps[j]`` and ``tops[j]`` belong to emitted token j + 1 (the
    first token comes from the prefill, which both runs compute identically)."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self.tops: list[float] = []

    def __call__(self, tree: DraftTree, target_logits: Tensor, verdict: Verdict) -> None:
        # target_logits: [N+1, V]; the emitted tokens come from the root and the accepted slots
        rows = target_logits[[0] + [i + 1 for i in verdict.accepted]].float()
        top2 = rows.topk(2, dim=-1).values  # [n, 2]
        self.gaps += (top2[:, 0] - top2[:, 1]).tolist()
        self.tops += top2[:, 0].tolist()


def tie_tolerance(dtype: torch.dtype, top_logit: float) -> float:
    """TIE_EPS machine epsilons of ``dtype``, relative to the top logit (at least 1)."""
    return TIE_EPS * torch.finfo(dtype).eps * max(1.0, abs(top_logit))


@dataclass(frozen=True)
class Mismatch:
    """position: index of the first differing emitted token; gap_sd / gap_ar: the top-2 logit gap
    there in each run (None where that run did not reach it); kind: "tie" or "real"."""

    position: int
    gap_sd: float | None
    gap_ar: float | None
    tolerance: float
    kind: str

    def to_dict(self) -> dict:
        return asdict(self)


def classify(sd_tokens: list[int], ar_tokens: list[int], sd: GapRecorder, ar: GapRecorder,
             dtype: torch.dtype) -> Mismatch | None:
    """The first divergence of two greedy runs, classified; None if the tokens are equal."""
    if sd_tokens == ar_tokens:
        return None
    j = next((i for i, (a, b) in enumerate(zip(sd_tokens, ar_tokens)) if a != b),
             min(len(sd_tokens), len(ar_tokens)))
    gaps, tops = [], []
    for rec in (sd, ar):
        reached = 1 <= j <= len(rec.gaps)
        gaps.append(rec.gaps[j - 1] if reached else None)
        tops.append(rec.tops[j - 1] if reached else 0.0)
    tol = tie_tolerance(dtype, max(abs(t) for t in tops))
    tie = any(g is not None and g <= tol for g in gaps)
    return Mismatch(j, gaps[0], gaps[1], tol, "tie" if tie else "real")

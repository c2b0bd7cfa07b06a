"""A chain of k draft tokens: classic speculative decoding as a degenerate tree."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.interfaces import Drafter
from ..core.sampling import SamplingConfig, logits_to_probs, sample
from ..core.tree import DraftTree


@dataclass(frozen=True)
class ChainConfig:
    k: int = 4

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"chain k must be >= 1, got {self.k}")


@dataclass(frozen=True)
class ChainBuilder:
    cfg: ChainConfig = ChainConfig()

    def __call__(self, drafter: Drafter, sampling: SamplingConfig,
                 generator: torch.Generator | None = None) -> DraftTree:
        logits = drafter.root()  # [V]
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        path_p = 1.0
        scores: list[float] = []
        for i in range(self.cfg.k):
            q = logits_to_probs(logits, sampling)  # [V]
            t = int(q.argmax()) if sampling.greedy else sample(q, generator)
            tokens.append(t)
            rows.append(q)
            path_p *= float(q[t])
            scores.append(path_p)
            if i + 1 < self.cfg.k:
                logits = drafter.expand(torch.tensor([t]), torch.tensor([i - 1]))[0]
        rows.append(torch.zeros_like(rows[-1]))  # the last slot has no children
        dev = rows[0].device
        return DraftTree(
            tokens=torch.tensor(tokens, dtype=torch.long, device=dev),
            parents=torch.arange(-1, len(tokens) - 1, dtype=torch.long, device=dev),
            draft_probs=torch.stack(rows) if not sampling.greedy else None,
            sampled=not sampling.greedy,
            scores=torch.tensor(scores),
        )

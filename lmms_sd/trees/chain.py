"""A chain of k draft tokens: classic speculative decoding as a degenerate tree.

The greedy path stays on the device: each token is the argmax tensor itself, fed straight back
to the drafter, so drafting k tokens makes no host sync (the loop reads the tokens once).
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
    # parents of the i-th expand call (the previous node), made once rather than every step
    _parents: tuple[torch.Tensor, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_parents",
                           tuple(torch.tensor([i - 1]) for i in range(self.cfg.k)))

    def __call__(self, drafter: Drafter, sampling: SamplingConfig,
                 generator: torch.Generator | None = None) -> DraftTree:
        if sampling.greedy:
            return self._greedy(drafter)
        logits = drafter.root()  # [V]
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        for i in range(self.cfg.k):
            q = logits_to_probs(logits, sampling)  # [V]
            t = sample(q, generator)
            tokens.append(t)
            rows.append(q)
            if i + 1 < self.cfg.k:
                logits = drafter.expand(torch.tensor([t]), self._parents[i])[0]
        dev = rows[0].device
        token_t = torch.tensor(tokens, dtype=torch.long, device=dev)
        probs = torch.stack(rows)  # [k, V]
        scores = probs.gather(1, token_t[:, None])[:, 0].cumprod(0)
        rows.append(torch.zeros_like(rows[-1]))  # the last slot has no children
        return DraftTree(token_t, torch.arange(-1, self.cfg.k - 1, device=dev),
                         draft_probs=torch.stack(rows), sampled=True, scores=scores)

    def _greedy(self, drafter: Drafter) -> DraftTree:
        logits = drafter.root()  # [V]
        tokens, probs = [], []
        for i in range(self.cfg.k):
            p, t = torch.softmax(logits.float(), -1).max(-1, keepdim=True)  # [1], [1]
            tokens.append(t)
            probs.append(p)
            if i + 1 < self.cfg.k:
                logits = drafter.expand(t, self._parents[i])[0]
        token_t = torch.cat(tokens)
        return DraftTree(token_t, torch.arange(-1, self.cfg.k - 1, device=token_t.device),
                         scores=torch.cat(probs).cumprod(0))

"""An oracle drafter: the target's own continuation, each token right with probability ``alpha``.

It costs nothing to run, so a benchmark with it isolates the engine: with ``alpha`` = 1 every
chain of k drafts is accepted and the speedup is bounded only by the cost of verifying k+1
tokens against the cost of decoding one. A wrong token is the reference token + 1 (mod V);
right/wrong is drawn per (emitted position, depth) from a seeded generator, so runs repeat.
Draws and logit rows are memoised, so that the oracle's own cost stays near zero beside the
engine it measures.
"""
from __future__ import annotations

import random

from torch import Tensor

from ..testing.scripted import ScriptedDrafter


class OracleDrafter(ScriptedDrafter):
    def __init__(self, reference: list[int], alpha: float, vocab_size: int, seed: int = 0):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        super().__init__(reference, good=0, vocab_size=vocab_size)
        self.alpha, self.seed = alpha, seed
        self.name = f"oracle_{alpha:g}"
        self._proposals: dict[tuple[int, int], int] = {}
        self._rows: dict[int, Tensor] = {}

    def _proposal(self, depth: int) -> int:
        pos = self._emitted + depth - 1
        if pos >= len(self.reference):
            return 0
        key = (pos, depth)
        if key not in self._proposals:
            right = random.Random(f"{self.seed}/{pos}/{depth}").random() < self.alpha
            ref = self.reference[pos]
            self._proposals[key] = ref if right else (ref + 1) % self.vocab_size
        return self._proposals[key]

    def _row(self, token: int) -> Tensor:  # [V], shared: callers must not write into it
        if token not in self._rows:
            self._rows[token] = super()._row(token)
        return self._rows[token]

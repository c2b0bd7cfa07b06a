"""An oracle drafter: the target's own continuation, each token right with probability ``alpha``.

It costs nothing to run, so a benchmark with it isolates the engine: with ``alpha`` = 1 every
chain of k drafts is accepted and the speedup is bounded only by the cost of verifying k+1
tokens against the cost of decoding one. A wrong token is the reference token + 1 (mod V);
right/wrong is drawn per (emitted position, depth) from a seeded generator, so runs repeat.
"""
from __future__ import annotations

import random

from ..testing.scripted import ScriptedDrafter


class OracleDrafter(ScriptedDrafter):
    def __init__(self, reference: list[int], alpha: float, vocab_size: int, seed: int = 0):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        super().__init__(reference, good=0, vocab_size=vocab_size)
        self.alpha, self.seed = alpha, seed
        self.name = f"oracle_{alpha:g}"

    def _proposal(self, depth: int) -> int:
        pos = self._emitted + depth - 1
        if pos >= len(self.reference):
            return 0
        right = random.Random(f"{self.seed}/{pos}/{depth}").random() < self.alpha
        return self.reference[pos] if right else (self.reference[pos] + 1) % self.vocab_size

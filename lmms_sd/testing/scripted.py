"""A scripted drafter: proposes the target's own continuation for ``good`` tokens, then a wrong one.

Given the reference output (the target's greedy tokens), every step it drafts
``reference[pos : pos + good]`` followed by a token that differs from the reference, so partial
acceptance (``good`` accepted, then a rejection) is exercised at every step. Beyond the script
it proposes token 0. Logits are one-hot-like (0 for the proposal, -inf elsewhere), so any tree
builder picks the scripted token first.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..core.interfaces import PromptInputs, StepOutput


class ScriptedDrafter:
    needs_target_hidden = False

    def __init__(self, reference: list[int], good: int, vocab_size: int):
        self.reference, self.good, self.vocab_size = reference, good, vocab_size
        self.name = f"scripted_{good}"
        self.forwards = 0
        self._emitted = 0
        self._nodes: list[int] = []  # depth of each expanded node

    def begin(self, prompt: PromptInputs, target_prefill: StepOutput) -> None:
        self._emitted = 0

    def commit(self, tokens: list[int], hidden: Tensor | None) -> None:
        self._emitted += len(tokens)
        self._nodes = []

    def _proposal(self, depth: int) -> int:
        """The token proposed at ``depth`` (1 = the root's child) in this step."""
        pos = self._emitted + depth - 1  # index in the reference of that token
        if pos >= len(self.reference):
            return 0
        if depth <= self.good:
            return self.reference[pos]
        return (self.reference[pos] + 1) % self.vocab_size

    def _row(self, token: int) -> Tensor:  # [V]
        row = torch.full((self.vocab_size,), float("-inf"))
        row[token] = 0.0
        return row

    def root(self) -> Tensor:
        self._nodes = []
        return self._row(self._proposal(1))

    def expand(self, tokens: Tensor, parents: Tensor) -> Tensor:
        rows = []
        for p in parents.tolist():
            depth = (self._nodes[p] if p >= 0 else 0) + 1
            self._nodes.append(depth)
            rows.append(self._row(self._proposal(depth + 1)))
        return rows[0][None] if len(rows) == 1 else torch.stack(rows)

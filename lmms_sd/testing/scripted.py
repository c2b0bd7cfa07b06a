"""A scripted drafter: proposes the target's own continuation for ``good`` tokens, then a wrong one.

Given the reference output (the target's greedy tokens), every step it drafts
``reference[pos : pos + good]`` followed by a token that differs from the reference, so partial
acceptance (``good`` accepted, then a rejection) is exercised at every step. Beyond the script
it proposes token 0. Logits are one-hot-like (0 for the proposal, -inf elsewhere), so any tree
builder picks the scripted token first. ``ScriptedTreeDrafter`` does the same for branching
trees, with the reference token at later siblings.
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


class ScriptedTreeDrafter:
    """Branching drafts with the reference token at a chosen sibling rank, for greedy tests of
    trees end to end.

    In every slot the drafter scores ``width`` distinct tokens with logits 0, -0.5, -1, ...
    (rank 0 first) and the rest of the vocabulary at -4: real, non-one-hot distributions, so
    dynamic / opt / static builders grow trees several children wide. In a slot whose path so
    far is the reference, the reference token gets rank ``ranks[(step + depth) % len(ranks)]``
    (1 = the second sibling); a rank >= ``width`` leaves it out of the slot. Off the reference
    path the ranked tokens are arbitrary. ``ranks`` mixes depths and ranks across steps.
    """

    needs_target_hidden = False

    def __init__(self, reference: list[int], vocab_size: int, ranks: tuple[int, ...] = (1, 2, 0, 1, 3),
                 width: int = 4):
        if width + 1 > vocab_size:
            raise ValueError(f"width {width} needs a vocabulary of more than {width} tokens")
        self.reference, self.vocab_size, self.ranks, self.width = reference, vocab_size, ranks, width
        self.name = "scripted_tree"
        self.forwards = 0
        self._emitted = 0
        self._step = 0
        self._nodes: list[tuple[int, bool]] = []  # per expanded node: (depth, on the reference)

    def begin(self, prompt: PromptInputs, target_prefill: StepOutput) -> None:
        self._emitted, self._step = 0, 0

    def commit(self, tokens: list[int], hidden: Tensor | None) -> None:
        self._emitted += len(tokens)
        self._step += 1
        self._nodes = []

    def _right(self, depth: int) -> int | None:
        """The reference token after ``depth - 1`` draft tokens of this step, if any."""
        pos = self._emitted + depth - 1
        return self.reference[pos] if pos < len(self.reference) else None

    def _row(self, depth: int, on_reference: bool) -> Tensor:  # [V]
        right = self._right(depth) if on_reference else None
        base = right if right is not None else (7 * depth + self._step) % self.vocab_size
        ranked = [(base + 1 + j) % self.vocab_size for j in range(self.width)]  # never base
        if right is not None:
            rank = self.ranks[(self._step + depth) % len(self.ranks)]
            if rank < self.width:
                ranked = ranked[:rank] + [right] + ranked[rank: self.width - 1]
        row = torch.full((self.vocab_size,), -4.0)
        row[ranked] = -0.5 * torch.arange(len(ranked), dtype=torch.float32)
        return row

    def root(self) -> Tensor:
        self._nodes = []
        return self._row(1, True)

    def expand(self, tokens: Tensor, parents: Tensor) -> Tensor:
        rows = []
        for t, p in zip(tokens.tolist(), parents.tolist()):
            depth, on_ref = self._nodes[p] if p >= 0 else (0, True)
            on_ref = on_ref and t == self._right(depth + 1)
            self._nodes.append((depth + 1, on_ref))
            rows.append(self._row(depth + 2, on_ref))
        return torch.stack(rows)

"""A fake drafter for tests: pure torch, no model, logits a fixed function of the token path.

The logits after a sequence of tokens are ``scale * randn(V)`` from a generator seeded by
(``seed``, the last ``order`` tokens of the sequence), where the sequence is the committed
context followed by the node's path in the working tree. So two nodes with the same recent
path get the same distribution, in any tree, in any call, in any process.

It follows the ``Drafter`` protocol strictly: ``expand`` rejects a parent that is not an
earlier expanded node of this step. ``forwards`` counts ``root`` and ``expand`` calls (one
forward each, as a draft model would spend); ``expand_sizes`` records each expand's node count.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..core.interfaces import PromptInputs, StepOutput


class FakeDrafter:
    needs_target_hidden = False

    def __init__(self, vocab_size: int = 8, seed: int = 0, order: int = 3, scale: float = 3.0,
                 context: Sequence[int] = (0,), name: str = "fake"):
        if vocab_size < 2 or order < 1:
            raise ValueError(f"FakeDrafter: need vocab_size >= 2 and order >= 1, got "
                             f"{vocab_size}, {order}")
        self.vocab_size, self.seed, self.order, self.scale = vocab_size, seed, order, scale
        self.name = name
        self.forwards = 0
        self.expand_sizes: list[int] = []
        self.committed: list[int] = list(context)
        self._paths: list[list[int]] = []  # per expanded node of this step: its path
        self._cache: dict[tuple[int, ...], Tensor] = {}

    # ------------------------------------------------------------------ the fixed function
    def logits_after(self, tokens: Sequence[int]) -> Tensor:  # [V]
        """The logits that follow ``tokens`` (only the last ``order`` of them matter)."""
        key = tuple(int(t) for t in tokens[-self.order:])
        if key not in self._cache:
            gen = torch.Generator().manual_seed(hash((self.seed,) + key) & 0x7FFF_FFFF_FFFF_FFFF)
            self._cache[key] = self.scale * torch.randn(self.vocab_size, generator=gen)
        return self._cache[key].clone()

    def path(self, node: int) -> list[int]:
        """The tokens from the root's child down to expanded ``node`` of this step."""
        return list(self._paths[node])

    # ------------------------------------------------------------------ the Drafter protocol
    def begin(self, prompt: PromptInputs, target_prefill: StepOutput | None = None) -> None:
        self.committed = prompt.input_ids.tolist()
        self._paths = []

    def root(self) -> Tensor:  # [V]
        self.forwards += 1
        self._paths = []
        return self.logits_after(self.committed)

    def expand(self, tokens: Tensor, parents: Tensor) -> Tensor:  # [m], [m] -> [m, V]
        if tokens.dim() != 1 or parents.shape != tokens.shape or len(tokens) == 0:
            raise ValueError(f"expand: tokens {tuple(tokens.shape)} and parents "
                             f"{tuple(parents.shape)} must be equal non-empty 1-D shapes")
        rows = []
        for t, p in zip(tokens.tolist(), parents.tolist()):
            if not -1 <= p < len(self._paths):
                raise ValueError(f"expand: parent {p} is not an expanded node "
                                 f"(there are {len(self._paths)})")
            self._paths.append((self._paths[p] if p >= 0 else []) + [t])
            rows.append(self.logits_after(self.committed + self._paths[-1]))
        self.forwards += 1
        self.expand_sizes.append(len(rows))
        return torch.stack(rows)

    def commit(self, tokens: list[int], hidden: Tensor | None) -> None:
        self.committed += list(tokens)
        self._paths = []

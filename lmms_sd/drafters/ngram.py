"""MaG, the statistical draft at the bottom of CS Drafting's cascade: no model, no forwards.

The next token after a context ``s`` (the prompt's text tokens, the emitted tokens, then the
path of the tree node being expanded) is chosen by:
  1. longest suffix match: the largest ``l`` (at most ``max_match``) such that the last ``l``
     tokens of ``s`` also occur earlier, ending at a position ``p < len(s) - 1``; propose
     ``s[p + 1]``. Among occurrences of that longest length the MOST RECENT one wins (largest
     ``p``; ``match="recent"``, the default): recent text predicts the continuation better.
     ``match="earliest"`` takes the smallest ``p``, as the published ``mag.py`` does
     (``torch_index`` returns the first match). Occurrences may overlap the suffix.
     (The published code also searches the prompt before the output and copies up to k tokens
     at once; here the rule is applied token by token, so a chain keeps copying while the match
     extends, and may jump to a longer match.) How many tokens MaG proposes per call is the
     cascade's choice: the published cascade always asks for ``MAG_GENERATION`` = 10
     (``CascadeConfig.bottom_tokens``).
  2. no earlier occurrence of the last token: the bigram table's successor of the last token;
  3. no table entry (or no table): the table's ``fallback`` (the corpus' most frequent token);
     without a table, the most frequent token of ``s`` (ties: the smallest id);
  4. empty ``s``: the table's fallback, else token 0.
Image placeholder tokens are left out of the history (``PromptInputs.text_only_ids``).

As a ``Drafter`` it returns one-hot-like logits (0 for the proposal, -inf elsewhere), so any
builder picks the proposal with probability 1 and a sampled verifier sees a point-mass draft.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.interfaces import PromptInputs, StepOutput
from .bigram import BigramTable


MAG_GENERATION = 10  # tokens the published cascade asks of its bottom draft (csd.py)
MATCH_RULES = ("recent", "earliest")


@dataclass(frozen=True)
class MaGConfig:
    """max_match: the longest suffix compared; longer matches count as ties of this length.
    match: which occurrence of the longest match is copied: ``recent`` (ours) or ``earliest``
    (the published MaG)."""

    max_match: int = 64
    match: str = "recent"

    def __post_init__(self) -> None:
        if self.max_match < 1:
            raise ValueError(f"max_match must be >= 1, got {self.max_match}")
        if self.match not in MATCH_RULES:
            raise ValueError(f"MaG match must be one of {MATCH_RULES}, got {self.match!r}")


def longest_suffix_match(seq: Tensor, max_match: int, earliest: bool = False
                         ) -> tuple[int, int] | None:
    """Rule 1 on ``seq`` # [n] long: (match length, index of the continuation token), or None
    when the last token does not occur earlier. Ties of the longest length: the most recent
    occurrence, or the earliest one with ``earliest``."""
    n = len(seq)
    if n < 2:
        return None
    ends = torch.nonzero(seq[:-1] == seq[-1]).flatten()  # candidate match end positions p
    if len(ends) == 0:
        return None
    length = 1
    while length < max_match and length < n - 1:
        starts = ends - length                          # the position compared with seq[-1-length]
        ok = (starts >= 0) & (seq[starts.clamp(min=0)] == seq[n - 1 - length])
        if not bool(ok.any()):
            break
        ends, length = ends[ok], length + 1
    return length, int(ends.min() if earliest else ends.max()) + 1


def mag_next_token(seq: Tensor, table: BigramTable | None, max_match: int = 64,
                   earliest: bool = False) -> int:
    """The MaG proposal after ``seq`` # [n] long (rules 1-4 of the module docstring)."""
    match = longest_suffix_match(seq, max_match, earliest)
    if match is not None:
        return int(seq[match[1]])
    if table is not None:
        return table.lookup(int(seq[-1])) if len(seq) else table.fallback
    if len(seq) == 0:
        return 0
    counts = torch.bincount(seq)
    return int(counts.argmax())


class MaGDrafter:
    """MaG behind the ``Drafter`` protocol: deterministic proposals, ``forwards`` stays 0."""

    needs_target_hidden = False

    def __init__(self, vocab_size: int, table: BigramTable | None = None,
                 cfg: MaGConfig = MaGConfig(), name: str = "mag"):
        if table is not None and table.vocab_size > vocab_size:
            raise ValueError(f"bigram table covers {table.vocab_size} tokens, more than the "
                             f"vocabulary ({vocab_size})")
        self.vocab_size, self.table, self.cfg, self.name = vocab_size, table, cfg, name
        self.forwards = 0
        self._history = torch.zeros(0, dtype=torch.long)
        self._paths: list[list[int]] = []  # per expanded node of this step: its path from the root
        self._device = torch.device("cpu")  # the prompt's (the target's): where logits go

    def begin(self, prompt: PromptInputs, target_prefill: StepOutput) -> None:
        self._device = prompt.input_ids.device
        self._history = prompt.text_only_ids().detach().to("cpu", torch.long).flatten()
        self._paths = []

    def commit(self, tokens: list[int], hidden: Tensor | None) -> None:
        self._history = torch.cat([self._history, torch.tensor(tokens, dtype=torch.long)])
        self._paths = []

    def next_token(self, path: list[int]) -> int:
        """The proposal after the committed history followed by ``path``."""
        seq = self._history
        if path:
            seq = torch.cat([seq, torch.tensor(path, dtype=torch.long)])
        return mag_next_token(seq, self.table, self.cfg.max_match,
                              self.cfg.match == "earliest")

    def root(self) -> Tensor:  # [V]
        self._paths = []
        return self._one_hot([self.next_token([])])[0]

    def expand(self, tokens: Tensor, parents: Tensor) -> Tensor:  # [m], [m] -> [m, V]
        proposals = []
        for tok, par in zip(tokens.tolist(), parents.tolist()):
            path = (self._paths[par] if par >= 0 else []) + [tok]
            self._paths.append(path)
            proposals.append(self.next_token(path))
        return self._one_hot(proposals)

    def _one_hot(self, proposals: list[int]) -> Tensor:  # [m, V]: 0 at the proposal, -inf elsewhere
        rows = torch.full((len(proposals), self.vocab_size), float("-inf"))
        rows[torch.arange(len(proposals)), torch.tensor(proposals, dtype=torch.long)] = 0.0
        return rows.to(self._device)

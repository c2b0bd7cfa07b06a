"""The draft tree: what a drafter proposes and the target verifies in one forward.

Glossary
--------
root      the last committed token. It is already decided (sampled by the target) but its
          key/value entries are not yet in the target cache; the verify forward feeds it first.
node      a draft token, indexed 0..N-1 in topological order (a parent precedes its children).
parent    index of a node's parent; -1 means the root.
depth     1 for children of the root, 2 for their children, ...; the position offset of the
          node from the root in the sequence.
path      the root-to-node chain of node indices; a chain draft is a tree whose paths are all
          prefixes of one path.

Rows of target/draft distributions are indexed by *slot*: slot 0 is the root, slot i+1 is node
i. The distribution in slot s is over the token that follows slot s.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True)
class DraftTree:
    """A tree of draft tokens hanging from the root.

    tokens:   # [N] long, draft token of each node
    parents:  # [N] long, parent node index, -1 for the root; parents[i] < i
    draft_probs: # [N+1, V] float or None: the draft distribution in each slot, from which that
                 # slot's children were drawn. Needed only for stochastic verification of
                 # sampled children (``sampled=True``); None for a deterministic drafter.
    sampled:  True when each slot's children were sampled without replacement from
              ``draft_probs`` (Sequoia / chain speculative sampling); False when they were chosen
              deterministically (top-k, argmax, n-gram match: the EAGLE-2 multi-draft rule).
    scores:   # [N] float or None: the builder's estimate of each node's path acceptance
              # probability; ``expected_accept`` sums it (used for statistics only).
    """

    tokens: Tensor
    parents: Tensor
    draft_probs: Tensor | None = None
    sampled: bool = False
    scores: Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.dim() != 1 or self.parents.shape != self.tokens.shape:
            raise ValueError(f"tokens {tuple(self.tokens.shape)} and parents "
                             f"{tuple(self.parents.shape)} must be equal 1-D shapes")
        if not all(-1 <= p < i for i, p in enumerate(self.parent_list)):
            raise ValueError("parents must satisfy -1 <= parents[i] < i (topological order)")
        if self.sampled and self.draft_probs is None:
            raise ValueError("a tree of sampled children needs draft_probs")
        if self.draft_probs is not None and self.draft_probs.shape[0] != len(self.tokens) + 1:
            raise ValueError("draft_probs needs one row per slot (N+1 rows)")

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def chain(tokens: Tensor, draft_probs: Tensor | None = None, sampled: bool = False) -> "DraftTree":
        """A chain t0 -> t1 -> ... ; ``draft_probs`` [k+1, V] if given."""
        k = len(tokens)
        parents = torch.arange(-1, k - 1, dtype=torch.long, device=tokens.device)
        return DraftTree(tokens.long(), parents, draft_probs, sampled)

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> "DraftTree":
        z = torch.zeros(0, dtype=torch.long, device=device)
        return DraftTree(z, z.clone())

    # ------------------------------------------------------------------ derived views
    # Python lists are read once per tree (one host transfer each) and shared by every view:
    # the verify step and the loop's bookkeeping then run without further syncs.
    @cached_property
    def parent_list(self) -> list[int]:
        return self.parents.tolist()

    @cached_property
    def token_list(self) -> list[int]:
        return self.tokens.tolist()

    @cached_property
    def depth_list(self) -> list[int]:
        d: list[int] = []
        for p in self.parent_list:
            d.append(1 if p < 0 else d[p] + 1)
        return d

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def size(self) -> int:
        return len(self.tokens)

    @cached_property
    def depths(self) -> Tensor:  # [N] long, 1 for the root's children
        return torch.tensor(self.depth_list, dtype=torch.long, device=self.tokens.device)

    @property
    def depth(self) -> int:
        return max(self.depth_list, default=0)

    @cached_property
    def ancestor_mask(self) -> Tensor:  # [N, N] bool, [i, j] = j is i or an ancestor of i
        n = len(self)
        m = torch.zeros(n, n, dtype=torch.bool, device=self.tokens.device)
        for i, p in enumerate(self.parent_list):
            if p >= 0:
                m[i] = m[p]
            m[i, i] = True
        return m

    @cached_property
    def children(self) -> list[list[int]]:
        """children[s] = node indices whose parent is slot s (slot 0 = root), in node order."""
        ch: list[list[int]] = [[] for _ in range(len(self) + 1)]
        for i, p in enumerate(self.parent_list):
            ch[p + 1].append(i)
        return ch

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to ``node`` (inclusive)."""
        out: list[int] = []
        par = self.parent_list
        while node >= 0:
            out.append(node)
            node = par[node]
        return out[::-1]

    @cached_property
    def leaves(self) -> list[int]:
        has_child = set(p for p in self.parent_list if p >= 0)
        return [i for i in range(len(self)) if i not in has_child]

    @cached_property
    def paths(self) -> list[list[int]]:
        """Every root-to-leaf path (EAGLE's ``retrieve_indices`` without padding)."""
        return [self.path_to(leaf) for leaf in self.leaves]

    def slot_mask(self) -> Tensor:  # [N+1, N+1] bool: the attention of slots among themselves
        """Mask over slots (root first): each slot sees the root, its ancestors and itself."""
        n = len(self)
        m = torch.zeros(n + 1, n + 1, dtype=torch.bool, device=self.tokens.device)
        m[:, 0] = True
        m[1:, 1:] = self.ancestor_mask
        return m

    def slot_depths(self) -> Tensor:  # [N+1] long, 0 for the root
        return torch.cat([self.depths.new_zeros(1), self.depths])

    @cached_property
    def is_chain(self) -> bool:
        """True when the slots form one causal chain (no mask or positions needed)."""
        return self.parent_list == list(range(-1, len(self) - 1))

    @property
    def expected_accept(self) -> float | None:
        """The builder's predicted number of accepted draft tokens (sum of path scores)."""
        return None if self.scores is None else float(self.scores.sum())

    def within_depth(self, depth: int) -> "DraftTree":
        """The tree without its nodes deeper than ``depth`` (a slot loses all its children or
        none, so verification stays lossless)."""
        keep = self.depths <= depth  # [N] bool
        if bool(keep.all()):
            return self
        new_index = torch.cumsum(keep, 0) - 1
        par = self.parents[keep]
        parents = torch.where(par >= 0, new_index[par.clamp(min=0)], par)
        slots = torch.cat([keep.new_ones(1), keep])
        return DraftTree(self.tokens[keep], parents,
                         None if self.draft_probs is None else self.draft_probs[slots],
                         self.sampled, None if self.scores is None else self.scores[keep])

    def attention_mask(self, past_len: int) -> Tensor:  # [N+1, past_len + N+1] bool
        """The verify forward's mask: every slot sees all ``past_len`` cached positions, then the
        root, its ancestors and itself."""
        m = self.slot_mask()
        return torch.cat([m.new_ones(len(m), past_len), m], dim=1)


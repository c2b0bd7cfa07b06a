"""A fixed tree shape (Sequoia): every step drafts the same shape, one level per expand call.

The shape comes from a Sequoia growmap file or from Sequoia's dynamic programme over a measured
acceptance vector (``sequoia_dp.py``). The children of a slot are its top-b draft tokens
(deterministic, verified by the EAGLE-2 rule) or, in sampling mode with ``sample_children``,
b tokens sampled without replacement from the processed draft distribution (verified by the
Sequoia rule, which needs that distribution in ``draft_probs``). Sampled children stay in the
order they were drawn: the Sequoia rule must visit them in that order.

A slot gets at most as many children as its draft distribution has tokens of nonzero
probability (after top-k / top-p): sampling without replacement cannot go further, and the
shape's subtrees under the missing children are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.interfaces import Drafter
from ..core.sampling import SamplingConfig, logits_to_probs
from ..core.tree import DraftTree
from .growmap import TreeShape, load_growmap
from .sequoia_dp import load_acceptance, sequoia_plan


@dataclass(frozen=True)
class StaticConfig:
    """growmap: path of a Sequoia growmap (.pt).
    acceptance: a measured acceptance vector, "p0,p1,..." (or "p0;p1;...") or a Sequoia .pt
        file. Without a growmap the shape is Sequoia's DP optimum for ``budget`` draft nodes
        and ``depth`` draft levels; with one, the vector only sets the node scores.
    max_budget, max_depth: the same under Sequoia's names and counting (``tree_search.py``,
        ``demo-config.json``): the root is a node and a level, so Sequoia's ``max_budget=128,
        max_depth=10`` is ``budget=127, depth=9``. Give one name of each pair.
    sample_children: in sampling mode, sample children (True) or take the top-b (False)."""

    growmap: str = ""
    acceptance: str = ""
    budget: int | None = None
    depth: int | None = None
    max_budget: int | None = None
    max_depth: int | None = None
    sample_children: bool = True

    def __post_init__(self) -> None:
        if not self.growmap and not self.acceptance:
            raise ValueError("static tree needs a shape: give growmap=<file.pt> or "
                             "acceptance=<p0,p1,...|file.pt> (with budget and depth)")
        for ours, sequoia in (("budget", "max_budget"), ("depth", "max_depth")):
            if getattr(self, ours) is not None and getattr(self, sequoia) is not None:
                raise ValueError(f"static tree: give {ours} (draft nodes only) or {sequoia} "
                                 f"(Sequoia's, the root counted), not both")
        if self.draft_budget < 1 or self.draft_depth < 1:
            raise ValueError(f"static tree: budget and depth must be >= 1 (max_budget and "
                             f"max_depth >= 2), got {self.draft_budget}, {self.draft_depth}")

    @property
    def draft_budget(self) -> int:
        """Draft nodes, the root not counted (default 32)."""
        if self.max_budget is not None:
            return self.max_budget - 1
        return 32 if self.budget is None else self.budget

    @property
    def draft_depth(self) -> int:
        """Draft levels, the root not counted (default 8)."""
        if self.max_depth is not None:
            return self.max_depth - 1
        return 8 if self.depth is None else self.depth


@dataclass(frozen=True)
class StaticBuilder:
    """shape: the tree to draft. rank_accept: acceptance probability of the rank-r child; when
    given, a node's score is its product along the path (Sequoia's model), else the draft
    probability of the path."""

    shape: TreeShape
    rank_accept: tuple[float, ...] | None = None
    sample_children: bool = True

    @staticmethod
    def from_config(cfg: StaticConfig) -> StaticBuilder:
        acc = load_acceptance(cfg.acceptance) if cfg.acceptance else None
        if cfg.growmap:
            shape = load_growmap(cfg.growmap)
        else:
            shape = sequoia_plan(acc, cfg.draft_budget, cfg.draft_depth).shape
        return StaticBuilder(shape, acc, cfg.sample_children)

    def __call__(self, drafter: Drafter, sampling: SamplingConfig,
                 generator: torch.Generator | None = None) -> DraftTree:
        sampled = self.sample_children and not sampling.greedy
        kids = self.shape.children
        dists = logits_to_probs(drafter.root(), sampling)[None]  # [1, V]
        frontier = [(-1, -1, 1.0)]  # (shape node, tree node, path score) of slots to fill
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        rows: dict[int, Tensor] = {}  # tree slot -> draft distribution of its children
        expanded: dict[int, int] = {-1: -1}  # tree node -> its index among expanded nodes
        while True:
            nxt = []
            for (s, node, score), q in zip(frontier, dists):
                picks = _children(q, len(kids[s + 1]), sampled, generator)
                rows[node + 1] = q
                for rank, (kid, tok) in enumerate(zip(kids[s + 1], picks)):
                    tokens.append(tok)
                    parents.append(node)
                    scores.append(score * self._accept(rank, float(q[tok])))
                    if kids[kid + 1]:
                        nxt.append((kid, len(tokens) - 1, scores[-1]))
            if not nxt:
                break
            for _, node, _ in nxt:
                expanded[node] = len(expanded) - 1
            dev = dists.device
            logits = drafter.expand(torch.tensor([tokens[n] for _, n, _ in nxt], device=dev),
                                    torch.tensor([expanded[parents[n]] for _, n, _ in nxt],
                                                 device=dev))
            dists = logits_to_probs(logits, sampling)  # [len(nxt), V]
            frontier = nxt
        return _tree(tokens, parents, scores, rows if sampled else None, dists.device)

    def _accept(self, rank: int, draft_prob: float) -> float:
        if self.rank_accept is None:
            return draft_prob
        return self.rank_accept[rank] if rank < len(self.rank_accept) else 0.0


def _children(q: Tensor, b: int, sampled: bool, generator: torch.Generator | None) -> list[int]:
    """b distinct tokens from q # [V]: drawn without replacement, or the top b."""
    b = min(b, int((q > 0).sum()))
    if sampled:  # on the generator's device: a CPU generator cannot drive a CUDA kernel
        q = q if generator is None else q.to(generator.device)
        return torch.multinomial(q, b, replacement=False, generator=generator).tolist()
    return torch.topk(q, b).indices.tolist()


def _tree(tokens: list[int], parents: list[int], scores: list[float],
          rows: dict[int, Tensor] | None, device: torch.device) -> DraftTree:
    draft_probs = None
    if rows is not None:
        V = next(iter(rows.values())).shape[-1]
        draft_probs = torch.zeros(len(tokens) + 1, V, device=device)
        for slot, q in rows.items():
            draft_probs[slot] = q
    return DraftTree(torch.tensor(tokens, dtype=torch.long, device=device),
                     torch.tensor(parents, dtype=torch.long, device=device),
                     draft_probs=draft_probs, sampled=rows is not None,
                     scores=torch.tensor(scores, device=device))

"""OPT-Tree (Jikai0Wang/OPT-Tree): a layer-wise beam of ``nodes`` paths with an early stop on
the expected acceptance length.

Layer 1 is the root's best ``nodes`` children. Each further layer is one expand call on the
whole previous layer; every node offers its top ``nodes`` children, a child's weight is
parent weight x child score, and the global top ``nodes`` weights form the layer. After each
layer, E[A] = the sum of the top ``nodes`` weights over all layers so far (the expected number
of accepted tokens of the best tree of ``nodes`` nodes); growth stops when E[A] rises by less
than ``threshold`` over the previous layer (the first layer is measured against 0) or at
``max_depth`` layers. The tree is those top ``nodes`` nodes, the last layer included (as in
OPT-Tree's ``Tree.update``; it computes one more layer than it keeps, we do not).

``top_k`` narrows the beam: each node offers its top ``top_k`` children and a layer keeps the
global top ``top_k`` (EAGLE-2's beam, as the modality-aware thesis runs it: top_k 10, nodes 500,
so the budget rarely binds); the tree is still the top ``nodes`` of all layers. Without it the
beam is ``nodes`` wide (OPT-Tree).

Score hook: by default a child's score is its draft probability, so a weight is the draft
probability of the path. ``score_fn`` replaces it, e.g. with a calibrator that maps the draft
probability (and features) to the probability that the target accepts the child. It receives a
``ChildCandidates`` per layer and returns # [m, c] estimates in [0, 1] (values outside are
clipped). Weights must not grow along a path for the kept set to be a tree; clipping to
[0, 1] guarantees it. Children are chosen deterministically (``sampled=False``) in both modes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.interfaces import Drafter
from ..core.sampling import SamplingConfig, logits_to_probs
from ..core.tree import DraftTree
from .dynamic import best_first, keep_top


@dataclass(frozen=True)
class OptConfig:
    """nodes: tree size budget (and beam width unless ``top_k``); threshold: the least E[A] gain
    of a new layer; max_depth: the most layers; top_k: children per node and layer width
    (None: ``nodes``). Defaults are OPT-Tree's."""

    nodes: int = 60
    threshold: float = 0.5
    max_depth: int = 10
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.max_depth < 1 or (self.top_k is not None and self.top_k < 1):
            raise ValueError(f"opt tree: nodes, max_depth and top_k must be >= 1, got "
                             f"{self.nodes}, {self.max_depth}, {self.top_k}")

    @property
    def width(self) -> int:
        return self.nodes if self.top_k is None else min(self.top_k, self.nodes)
        if self.threshold < 0:
            raise ValueError(f"opt tree: threshold must be >= 0, got {self.threshold}")


@dataclass(frozen=True)
class ChildCandidates:
    """The children offered by one layer's frontier, as a score function sees them.

    probs:    # [m, c] draft probability of each candidate child, descending along a row
    tokens:   # [m, c] long, the candidate tokens
    dists:    # [m, V] the full processed draft distribution of each frontier node
    depth:    depth of the candidates (1 = children of the root)
    frontier: # [m] long, each frontier node's index among this step's expanded nodes, as the
              # drafter numbers them (-1 = the root); lets a scorer look up drafter features
    """

    probs: Tensor
    tokens: Tensor
    dists: Tensor
    depth: int
    frontier: Tensor


ScoreFn = Callable[[ChildCandidates], Tensor]


def draft_probability(c: ChildCandidates) -> Tensor:  # [m, c]
    """The default score: the draft's own probability of the child."""
    return c.probs


@dataclass(frozen=True)
class OptBuilder:
    cfg: OptConfig = OptConfig()
    score_fn: ScoreFn | None = None

    def __call__(self, drafter: Drafter, sampling: SamplingConfig,
                 generator: torch.Generator | None = None) -> DraftTree:
        n, k, score_fn = self.cfg.nodes, self.cfg.width, self.score_fn or draft_probability
        dists = logits_to_probs(drafter.root(), sampling)[None]  # [1, V]
        dev = dists.device
        # Every layer is expanded whole, in creation order, so a node's candidate id is also
        # its index among the drafter's expanded nodes.
        front = torch.tensor([-1], device=dev)  # frontier candidate ids (-1 = the root)
        front_w = torch.ones(1, device=dev)
        tokens: list[Tensor] = []
        parents: list[Tensor] = []
        weights: list[Tensor] = []
        expected = 0.0
        for depth in range(1, self.cfg.max_depth + 1):
            if depth > 1:
                logits = drafter.expand(torch.cat(tokens)[front], torch.cat(parents)[front])
                dists = logits_to_probs(logits, sampling)  # [m, V]
            probs, toks = dists.topk(min(k, dists.shape[-1]), dim=-1)  # [m, c]
            s = score_fn(ChildCandidates(probs, toks, dists, depth, front))
            if s.shape != probs.shape:
                raise ValueError(f"score_fn returned shape {tuple(s.shape)}, expected "
                                 f"{tuple(probs.shape)}")
            w = (front_w[:, None] * s.to(front_w.dtype).clamp(0, 1)).flatten()  # [m * c]
            pick = best_first(w)[:k]
            pick = pick[w[pick] > 0]
            if len(pick) == 0:
                break
            first = sum(len(x) for x in weights)
            tokens.append(toks.flatten()[pick])
            parents.append(front[pick // toks.shape[1]])
            weights.append(w[pick])
            front, front_w = first + torch.arange(len(pick), device=dev), w[pick]
            gain = float(torch.cat(weights).topk(min(n, first + len(pick))).values.sum()) - expected
            expected += gain
            if gain < self.cfg.threshold:
                break
        if not weights:
            return DraftTree.empty(dev)
        kept, new_parents = keep_top(torch.cat(parents), torch.cat(weights), n)
        return DraftTree(torch.cat(tokens)[kept], new_parents, scores=torch.cat(weights)[kept])

"""EAGLE-2's dynamic draft tree (as in MSD): grow a beam by cumulative log-probability, then
keep the globally best nodes.

1. the root's top_k tokens are the first candidates and the first frontier;
2. ``depth`` times: one expand call on the frontier; each frontier node offers its top_k
   children as candidates, scored by cumulative log-probability; the top_k new candidates form
   the next frontier;
3. the tree is the ``total_tokens - 1`` best candidates by cumulative log-probability, in the
   order they were created (which is topological). ``total_tokens`` counts the root, as in MSD's
   and EAGLE-2's ``cnets.py`` (``self.total_tokens = total_tokens - 1``): 59 drafts 58 nodes.
A child's cumulative score never exceeds its parent's, and ties go to the earlier candidate, so
a kept node's parent is always kept. The deepest node is at depth ``depth + 1``. Children are
chosen deterministically in both greedy and sampling mode (``sampled=False``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.interfaces import Drafter
from ..core.sampling import SamplingConfig, logits_to_probs
from ..core.tree import DraftTree


@dataclass(frozen=True)
class DynamicConfig:
    """Defaults are MSD's (and EAGLE-2's): depth 5, top_k 10, total_tokens 59 (the root
    included: 58 draft nodes)."""

    depth: int = 5
    top_k: int = 10
    total_tokens: int = 59

    def __post_init__(self) -> None:
        for name in ("depth", "top_k", "total_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"dynamic tree: {name} must be >= 1, got {getattr(self, name)}")
        if self.total_tokens < 2:
            raise ValueError(f"dynamic tree: total_tokens counts the root (MSD's convention), so "
                             f"it must be >= 2 to draft anything, got {self.total_tokens}")

    @property
    def draft_nodes(self) -> int:
        return self.total_tokens - 1


@dataclass(frozen=True)
class DynamicBuilder:
    cfg: DynamicConfig = DynamicConfig()

    def __call__(self, drafter: Drafter, sampling: SamplingConfig,
                 generator: torch.Generator | None = None) -> DraftTree:
        k = self.cfg.top_k
        logp = logits_to_probs(drafter.root(), sampling).log()  # [V]
        score, tok = logp.topk(min(k, logp.shape[-1]))
        tokens, parents, scores = [tok], [torch.full_like(tok, -1)], [score]
        frontier = torch.arange(len(tok), device=tok.device)  # candidate ids
        expanded = {-1: -1}  # candidate id -> index among expanded nodes
        for _ in range(self.cfg.depth):
            all_tok, all_par, all_score = torch.cat(tokens), torch.cat(parents), torch.cat(scores)
            frontier = frontier[all_score[frontier].isfinite()]
            if len(frontier) == 0:
                break
            for c in frontier.tolist():
                expanded[c] = len(expanded) - 1
            par_exp = torch.tensor([expanded[p] for p in all_par[frontier].tolist()],
                                   device=frontier.device)
            logp = logits_to_probs(drafter.expand(all_tok[frontier], par_exp), sampling).log()
            child_score, child_tok = logp.topk(min(k, logp.shape[-1]), dim=-1)  # [m, k]
            cum = (all_score[frontier, None] + child_score).flatten()  # [m * k]
            first = len(all_tok)
            tokens.append(child_tok.flatten())
            parents.append(frontier.repeat_interleave(child_tok.shape[1]))
            scores.append(cum)
            frontier = first + best_first(cum)[:k]
        cand_par, cand_score = torch.cat(parents), torch.cat(scores)
        kept, new_parents = keep_top(cand_par, cand_score, self.cfg.draft_nodes)
        return DraftTree(torch.cat(tokens)[kept], new_parents, scores=cand_score[kept].exp())


def best_first(key: Tensor) -> Tensor:  # [C] -> [C] long
    """Indices of ``key`` from largest to smallest, ties in index order."""
    return torch.sort(-key, stable=True).indices


def keep_top(parents: Tensor, key: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Keep the ``n`` candidates with the largest finite ``key`` (ties: the earlier one).

    parents: # [C] long, each candidate's parent candidate (-1 = the root), parents[i] < i
    key:     # [C] float, never larger for a child than for its parent
    Returns the kept candidate ids in creation order # [n'] and their parents re-indexed among
    the kept ones # [n'] (-1 = the root).
    """
    order = best_first(key)[:n]
    kept = order[key[order].isfinite()].sort().values
    new_index = torch.full_like(parents, -1)
    new_index[kept] = torch.arange(len(kept), device=kept.device)
    par = parents[kept]
    new_parents = torch.where(par >= 0, new_index[par.clamp(min=0)], par)
    if bool(((par >= 0) & (new_parents < 0)).any()):
        raise RuntimeError("keep_top: a kept node lost its parent; the key must not grow "
                           "from parent to child")
    return kept, new_parents

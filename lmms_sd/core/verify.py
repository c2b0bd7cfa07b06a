"""Tree verification as pure functions.

Glossary (as in vLLM's rejection sampler)
--------
accepted   draft nodes along one root-to-node path that the target agrees to emit.
recovered  the token the target emits where it rejected every child of a slot (sampled from
           the residual distribution, or the argmax in greedy mode).
bonus      the token the target emits after an accepted leaf (sampled from its plain
           distribution). ``Verdict.next_token`` is the recovered or bonus token.

Rows of ``target`` are slots (see ``tree.py``): row 0 is the distribution after the root,
row i+1 the distribution after node i.

Lossless rules for the stochastic case, applied slot by slot from the root down:
- deterministic children (``tree.sampled`` False; top-k, n-gram, argmax drafts): the EAGLE-2
  multi-draft rule. Try children in order; accept child x with probability p[x]; on
  rejection set p[x] = 0 and renormalise. This is rejection sampling against a point-mass draft.
- sampled children (``tree.sampled`` True; drawn without replacement from q): the Sequoia rule.
  Accept x if r * q[x] < p[x]; else p <- normalize(relu(p - q)), q[x] <- 0, q <- normalize(q).
  With one child per slot this is Leviathan/Chen speculative sampling.
If no child is accepted, the next token is drawn from the final p.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .sampling import residual, sample
from .tree import DraftTree


@dataclass(frozen=True)
class Verdict:
    """accepted: node indices of the accepted path (root's child first); next_token: the
    target's own token after that path."""

    accepted: list[int]
    next_token: int

    @property
    def num_accepted(self) -> int:
        return len(self.accepted)


def verify_greedy(tree: DraftTree, target_logits: Tensor) -> Verdict:
    """Longest path whose every token equals the target's argmax in its parent slot.

    target_logits: # [N+1, V]
    """
    assert target_logits.shape[0] == len(tree) + 1, "one target row per slot"
    argmax = target_logits.argmax(-1).tolist()
    tokens = tree.token_list
    accepted: list[int] = []
    slot = 0
    while True:
        want = argmax[slot]
        nxt = next((c for c in tree.children[slot] if tokens[c] == want), None)
        if nxt is None:
            return Verdict(accepted, want)
        accepted.append(nxt)
        slot = nxt + 1


def verify_stochastic(tree: DraftTree, target_probs: Tensor,
                      generator: torch.Generator | None = None) -> Verdict:
    """Lossless multi-draft rejection sampling down the tree (rules in the module docstring).

    target_probs: # [N+1, V] processed target distributions (``logits_to_probs``)
    """
    assert target_probs.shape[0] == len(tree) + 1, "one target row per slot"
    tokens = tree.token_list
    accepted: list[int] = []
    slot = 0
    while True:
        p = target_probs[slot].double().clone()
        q = tree.draft_probs[slot].double().clone() if tree.sampled else None
        chosen = None
        for child in tree.children[slot]:
            x = tokens[child]
            r = float(torch.rand((), generator=generator, dtype=torch.float64))
            if q is None:  # point-mass draft on x: accept with probability p[x]
                if r < p[x]:
                    chosen = child
                    break
                p[x] = 0.0
                p = p / p.sum()
            else:
                if r * q[x] < p[x]:
                    chosen = child
                    break
                p = residual(p, q)
                q[x] = 0.0
                qs = q.sum()
                q = q / qs if qs > 0 else q
        if chosen is None:
            return Verdict(accepted, sample(p.float(), generator))
        accepted.append(chosen)
        slot = chosen + 1

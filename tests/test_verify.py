"""Verification with hand-built logits: each case forces one outcome (one-line spec each)."""
from __future__ import annotations

import pytest
import torch

from lmms_sd.core.sampling import SamplingConfig, logits_to_probs, residual
from lmms_sd.core.tree import DraftTree
from lmms_sd.core.verify import verify_greedy, verify_stochastic

V = 8


def rows(*argmaxes: int) -> torch.Tensor:
    """Target logits, one row per slot, each peaked at the given token."""
    out = torch.zeros(len(argmaxes), V)
    for i, a in enumerate(argmaxes):
        out[i, a] = 5.0
    return out


def chain(*tokens: int) -> DraftTree:
    return DraftTree.chain(torch.tensor(tokens))


def tree(tokens: list[int], parents: list[int]) -> DraftTree:
    return DraftTree(torch.tensor(tokens), torch.tensor(parents))


GREEDY_CASES = [
    # (spec, tree, target argmax per slot, accepted nodes, next token)
    ("all accepted, bonus from the last slot", chain(1, 2, 3), rows(1, 2, 3, 4), [0, 1, 2], 4),
    ("first token rejected: recovered token from the root", chain(1, 2, 3), rows(5, 2, 3, 4), [], 5),
    ("mismatch in the middle", chain(1, 2, 3), rows(1, 6, 3, 4), [0], 6),
    ("empty draft: plain decoding step", DraftTree.empty(), rows(7), [], 7),
    ("second sibling accepted", tree([1, 2, 3], [-1, -1, 1]), rows(2, 0, 3, 6), [1, 2], 6),
    ("deep branch under non-first child", tree([1, 2, 4, 5], [-1, -1, 0, 1]), rows(2, 4, 5, 7, 3), [1, 3], 3),
    ("no sibling matches", tree([1, 2], [-1, -1]), rows(3, 0, 0), [], 3),
]


@pytest.mark.parametrize("spec,t,logits,accepted,nxt", GREEDY_CASES, ids=[c[0] for c in GREEDY_CASES])
def test_greedy_outcomes(spec, t, logits, accepted, nxt):
    v = verify_greedy(t, logits)
    assert (v.accepted, v.next_token) == (accepted, nxt)


def test_stochastic_point_mass_target_acts_like_greedy():
    # a target that is certain (one-hot) accepts exactly the matching path, whatever the seed
    t = tree([1, 2, 3], [-1, -1, 1])
    probs = torch.nn.functional.one_hot(torch.tensor([2, 0, 3, 6]), V).float()
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        v = verify_stochastic(t, probs, g)
        assert (v.accepted, v.next_token) == ([1, 2], 6)


def test_stochastic_sampled_chain_rejects_token_outside_target_support():
    # q puts mass on token 1, target gives it 0: always rejected, next token from relu(p - q)
    q = torch.zeros(2, V)
    q[0, 1] = 0.5
    q[0, 2] = 0.5
    t = DraftTree.chain(torch.tensor([1]), draft_probs=q, sampled=True)
    p = torch.zeros(2, V)
    p[0, 2] = 0.5
    p[0, 3] = 0.5
    p[1, 0] = 1.0
    for seed in range(10):
        v = verify_stochastic(t, p, torch.Generator().manual_seed(seed))
        assert v.accepted == [] and v.next_token == 3  # residual relu(p - q) = mass on 3 only


def test_residual_and_processing():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.25, 0.25, 0.5])
    assert torch.allclose(residual(p, q), torch.tensor([0.5, 0.5, 0.0]))
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    top1 = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_k=1))
    assert torch.equal(top1, torch.tensor([[1.0, 0, 0, 0]]))
    nucleus = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_p=0.5))
    assert nucleus[0, 0] == 1.0  # the top token alone already holds >= half the mass
    full = logits_to_probs(logits, SamplingConfig(temperature=2.0))
    assert torch.allclose(full, torch.softmax(logits / 2, -1))


def test_tree_validation_errors():
    with pytest.raises(ValueError, match="topological"):
        tree([1, 2], [1, -1])
    with pytest.raises(ValueError, match="draft_probs"):
        DraftTree.chain(torch.tensor([1]), sampled=True)
    with pytest.raises(ValueError):
        SamplingConfig(temperature=-1)

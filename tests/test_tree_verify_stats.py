"""Statistical losslessness of ``verify_stochastic`` on trees and chains.

A two-level world over a small vocabulary: the target emits a ~ p0, then b ~ p1[a]; the draft
proposes from q0 and q1[a]. For every regime we run ``verify_stochastic`` on many independently
drafted trees (fixed seeds) and compare, by chi-square, the first emitted token with p0 and
the first two emitted tokens with p0[a] * p1[a, b]. When a step emits a single token, the
second token belongs to the next step; the first-token tests cover that step, so the harness
draws it exactly from p1[a]. That these tests and those through ``generate()``
(``test_sampling_generate.py``) have power is shown on the real code: one-line mutants of
``lmms_sd/core`` must fail them (``python -m lmms_sd.testing.mutants``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from lmms_sd.core.sampling import SamplingConfig
from lmms_sd.core.tree import DraftTree
from lmms_sd.core.verify import Verdict, verify_stochastic
from lmms_sd.testing.fake_drafter import FakeDrafter
from lmms_sd.trees import make_builder

V = 6
DRAWS = 6_000
PASS_P = 1e-3  # a p-value above this passes the test


@dataclass(frozen=True)
class World:
    """Target p0 # [V], p1 # [V, V]; draft q0 # [V], q1 # [V, V]; rows of p1 and q1 are indexed
    by the first token."""

    p0: torch.Tensor
    p1: torch.Tensor
    q0: torch.Tensor
    q1: torch.Tensor


def dirichlet(rng: np.random.Generator, *shape: int, alpha: float = 1.0) -> torch.Tensor:
    return torch.tensor(rng.dirichlet(np.full(V, alpha), size=shape), dtype=torch.float32)


def random_world(seed: int, draft: str) -> World:
    rng = np.random.default_rng(seed)
    p0, p1 = dirichlet(rng, 1)[0], dirichlet(rng, V)
    if draft == "equal":
        return World(p0, p1, p0.clone(), p1.clone())
    if draft == "random":
        return World(p0, p1, dirichlet(rng, 1)[0], dirichlet(rng, V))
    if draft == "peaky":  # a confident draft that partly agrees with the target: many
        # rejections of high-q tokens, where a wrong residual or renormalisation shows most
        q0 = 0.3 * p0 + 0.7 * dirichlet(rng, 1, alpha=0.3)[0]
        return World(p0, p1, q0, 0.3 * p1 + 0.7 * dirichlet(rng, V, alpha=0.3))
    if draft == "one_hot":  # a deterministic draft: all its mass on one token per context
        hot = torch.eye(V)[torch.tensor(rng.integers(0, V, size=V + 1))]
        return World(p0, p1, hot[0], hot[1:])
    if draft == "disjoint":  # target on tokens 0..2, draft on 3..5
        lo, hi = torch.zeros(V), torch.zeros(V)
        lo[:3], hi[3:] = 1.0, 1.0
        p0, p1 = p0 * lo / (p0 * lo).sum(), p1 * lo / (p1 * lo).sum(-1, keepdim=True)
        q0, q1 = dirichlet(rng, 1)[0] * hi, dirichlet(rng, V) * hi
        return World(p0, p1, q0 / q0.sum(), q1 / q1.sum(-1, keepdim=True))
    raise ValueError(draft)


@dataclass(frozen=True)
class Drafts:
    """Trees of one shape for many draws: root children ``first`` # [n, k1] and the children
    of depth-1 node j ``second[:, j]`` # [n, k1, k2]; ``sampled`` picks the verification rule."""

    first: np.ndarray
    second: np.ndarray
    sampled: bool


def gumbel_top(q: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """# [..., V] -> [..., k]: k tokens drawn without replacement from each row of q."""
    with np.errstate(divide="ignore"):
        keys = np.log(q) + rng.gumbel(size=q.shape)
    return np.argsort(-keys, axis=-1)[..., :k]


def topk_tree(w: World, n: int, rng: np.random.Generator) -> Drafts:
    """Deterministic children (EAGLE-2 rule): top-3 at the root, top-2 below each."""
    first = np.argsort(-w.q0.numpy())[:3]
    second = np.argsort(-w.q1.numpy()[first], axis=-1)[:, :2]
    return Drafts(np.tile(first, (n, 1)), np.tile(second, (n, 1, 1)), sampled=False)


def sampled_tree(w: World, n: int, rng: np.random.Generator) -> Drafts:
    """Children drawn without replacement (Sequoia rule): 3 at the root, 2 below each."""
    first = gumbel_top(np.tile(w.q0.numpy(), (n, 1)), 3, rng)
    return Drafts(first, gumbel_top(w.q1.numpy()[first], 2, rng), sampled=True)


def sampled_chain(w: World, n: int, rng: np.random.Generator) -> Drafts:
    """Classic speculative sampling: x1 ~ q0, x2 ~ q1[x1]."""
    first = gumbel_top(np.tile(w.q0.numpy(), (n, 1)), 1, rng)
    return Drafts(first, gumbel_top(w.q1.numpy()[first], 1, rng), sampled=True)


Drafting = Callable[[World, int, np.random.Generator], Drafts]
Verifier = Callable[[DraftTree, torch.Tensor, torch.Generator], Verdict]


def trees(w: World, d: Drafts) -> Iterator[tuple[DraftTree, torch.Tensor]]:
    """One (tree, target rows # [N+1, V]) per draw. Target rows: p0 at the root, p1[x] after a
    depth-1 token x, uniform deeper; draft rows likewise from q0, q1, zeros at the leaves."""
    n, k1, k2 = d.second.shape
    parents = torch.tensor([-1] * k1 + [j for j in range(k1) for _ in range(k2)])
    tokens = torch.from_numpy(np.concatenate([d.first, d.second.reshape(n, -1)], axis=1))
    slot_row = np.concatenate([np.zeros((n, 1), dtype=np.int64), 1 + d.first,
                               np.full((n, k1 * k2), V + 1)], axis=1)  # [n, N+1] table rows
    rest = torch.full((1, V), 1.0 / V)
    target = torch.cat([w.p0[None], w.p1, rest])[torch.from_numpy(slot_row)]
    draft = torch.cat([w.q0[None], w.q1, 0 * rest])[torch.from_numpy(slot_row)]
    for i in range(n):
        yield DraftTree(tokens[i], parents, draft[i] if d.sampled else None, d.sampled), target[i]


def simulate(w: World, drafting: Drafting, verify: Verifier, draws: int,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of the first emitted token # [V] and of the first two # [V, V]."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    # the next step's first token, for each draw and each possible first token: # [n, V]
    cont = (w.p1.numpy().cumsum(-1)[None] < rng.random((draws, V, 1))).sum(-1).clip(max=V - 1)
    first, joint = np.zeros(V, dtype=np.int64), np.zeros((V, V), dtype=np.int64)
    for i, (tree, target) in enumerate(trees(w, drafting(w, draws, rng))):
        v = verify(tree, target, gen)
        out = tree.tokens[v.accepted].tolist() + [v.next_token]
        if len(out) == 1:  # the next step emits the second token
            out.append(int(cont[i, out[0]]))
        first[out[0]] += 1
        joint[out[0], out[1]] += 1
    return first, joint


def pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square p-value of counts against probs; cells expecting fewer than 5 are pooled.
    0 if a token of zero probability was emitted."""
    counts, probs = counts.ravel(), probs.ravel().astype(np.float64)
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = counts.sum() * probs / probs.sum()
    big = expected >= 5
    obs, exp = list(counts[big]), list(expected[big])
    if expected[~big].sum() > 0:
        obs.append(counts[~big].sum())
        exp.append(expected[~big].sum())
    return float(chisquare(obs, exp).pvalue)


def pvalues(w: World, drafting: Drafting, verify: Verifier, draws: int = DRAWS,
            seed: int = 0) -> tuple[float, float]:
    first, joint = simulate(w, drafting, verify, draws, seed)
    want_joint = (w.p0[:, None] * w.p1).numpy()
    return pvalue(first, w.p0.numpy()), pvalue(joint, want_joint)


REGIMES = [
    # (id, drafting, draft kind of the world)
    ("topk_tree_eagle_rule", topk_tree, "peaky"),
    ("sampled_tree_sequoia_rule", sampled_tree, "peaky"),
    ("chain_q_equals_p", sampled_chain, "equal"),
    ("chain_disjoint_supports", sampled_chain, "disjoint"),
    ("chain_random_q", sampled_chain, "random"),
    ("chain_deterministic_q", sampled_chain, "one_hot"),
]


@pytest.mark.parametrize("drafting,draft", [r[1:] for r in REGIMES], ids=[r[0] for r in REGIMES])
def test_verify_stochastic_is_lossless(drafting: Drafting, draft: str) -> None:
    # the first token and the first two tokens follow the target, whatever the draft
    w = random_world(seed=1, draft=draft)
    p_first, p_joint = pvalues(w, drafting, verify_stochastic)
    assert p_first > PASS_P and p_joint > PASS_P, (p_first, p_joint)


# ---------------------------------------------------------------- builders end to end
def target_rows(target: FakeDrafter, context: list[int], tree: DraftTree) -> torch.Tensor:
    """The fake target's distribution after each slot: # [N+1, V]."""
    paths = [[]] + [tree.tokens[tree.path_to(i)].tolist() for i in range(len(tree))]
    return torch.softmax(torch.stack([target.logits_after(context + p) for p in paths]), -1)


@pytest.mark.parametrize("name,params,draws", [
    ("static", {"acceptance": "0.5,0.3", "budget": 5, "max_depth": 2}, 2500),
    ("dynamic", {"depth": 2, "top_k": 3, "total_tokens": 8}, 6000),
    ("opt", {"nodes": 8, "threshold": 0.05, "max_depth": 3}, 6000),
], ids=["static_sampled", "dynamic", "opt"])
def test_builders_with_verify_are_lossless(name: str, params: dict, draws: int) -> None:
    # a fake draft and a different fake target: the emitted tokens follow the target
    sampling = SamplingConfig(temperature=1.0)
    drafter = FakeDrafter(vocab_size=V, seed=3, scale=1.5)
    target = FakeDrafter(vocab_size=V, seed=4, scale=1.5)
    ctx = drafter.committed
    p0 = torch.softmax(target.logits_after(ctx), -1)
    p1 = torch.softmax(torch.stack([target.logits_after(ctx + [a]) for a in range(V)]), -1)
    builder = make_builder(name, **params)
    gen = torch.Generator().manual_seed(5)
    tree = builder(drafter, sampling, gen)
    assert tree.sampled == (name == "static")  # the others draft deterministically: one tree
    rows = target_rows(target, ctx, tree)
    first, joint = np.zeros(V, dtype=np.int64), np.zeros((V, V), dtype=np.int64)
    for _ in range(draws):
        if tree.sampled:
            tree = builder(drafter, sampling, gen)
            rows = target_rows(target, ctx, tree)
        v = verify_stochastic(tree, rows, gen)
        out = tree.tokens[v.accepted].tolist() + [v.next_token]
        if len(out) == 1:
            out.append(int(torch.multinomial(p1[out[0]], 1, generator=gen)))
        first[out[0]] += 1
        joint[out[0], out[1]] += 1
    p_first, p_joint = pvalue(first, p0.numpy()), pvalue(joint, (p0[:, None] * p1).numpy())
    assert p_first > PASS_P and p_joint > PASS_P, (p_first, p_joint)

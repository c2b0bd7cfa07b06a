"""Cascade speculative drafting: hand-traced cascades, and end-to-end equality with the target.

The target here is a tiny pure-torch ModelAdapter (``FakeTarget``): a deterministic function of
the visible (token, position) pairs, so wrong positions or masks change its output. End-to-end
tests on the tiny LLaVA / Qwen2-VL adapters belong with the table-driven adapter tests.
"""
from __future__ import annotations

import functools
from collections import Counter
from typing import Callable

import pytest
import torch
from scipy.stats import chisquare
from torch import Tensor

from lmms_sd.core.generate import GenerationConfig, generate
from lmms_sd.core.interfaces import Drafter, ModelAdapter, PromptInputs, StepOutput
from lmms_sd.core.sampling import SamplingConfig
from lmms_sd.drafters.bigram import BigramTable
from lmms_sd.drafters.cascade import (CascadeBuilder, CascadeConfig, CascadeDrafter, cascade_cost,
                                      csd)
from lmms_sd.drafters.cost import COST_TABLES, simulate_cost, unit_cost
from lmms_sd.drafters.ngram import MaGDrafter
from lmms_sd.trees.chain import ChainBuilder, ChainConfig


# ---------------------------------------------------------------- fakes
class TinyLM:
    """logits at a query = tanh(sum over visible keys j of decay^(pos_q - pos_j) E[tok_j]) @ W."""

    def __init__(self, vocab: int, dim: int = 24, seed: int = 0, decay: float = 0.8):
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.decay = vocab, decay
        self.emb = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
        self.out = torch.randn(dim, vocab, generator=g, dtype=torch.float64) * 4 / dim ** 0.5

    def perturbed(self, noise: float, seed: int) -> "TinyLM":
        other = TinyLM(self.vocab, self.emb.shape[1], seed, self.decay)
        other.emb = self.emb.clone()
        g = torch.Generator().manual_seed(1000 + seed)
        other.out = self.out + noise * torch.randn(self.out.shape, generator=g, dtype=torch.float64)
        return other

    def logits(self, key_tok: Tensor, key_pos: Tensor, q_pos: Tensor, mask: Tensor) -> Tensor:
        # key_tok, key_pos: [S]; q_pos: [Q]; mask: [Q, S] bool -> [Q, V]
        rel = (q_pos[:, None] - key_pos[None, :]).clamp(min=0).double()
        w = self.decay ** rel * mask.double()
        return torch.tanh(w @ self.emb[key_tok]) @ self.out

    def next_logits(self, seq: list[int]) -> Tensor:  # [V] after the causal sequence
        pos = torch.arange(len(seq))
        visible = torch.ones(1, len(seq), dtype=torch.bool)
        return self.logits(torch.tensor(seq), pos, pos[-1:], visible)[0]


class FakeTarget:
    """A ModelAdapter over TinyLM whose 'KV cache' is the list of (token, position) pairs."""

    def __init__(self, lm: TinyLM):
        self.lm, self.vocab_size = lm, lm.vocab
        self.tok = torch.zeros(0, dtype=torch.long)
        self.pos = torch.zeros(0, dtype=torch.long)

    @property
    def seq_len(self) -> int:
        return len(self.tok)

    def prefill(self, prompt: PromptInputs, *, hidden: bool = False,
                embeds: bool = False) -> StepOutput:
        self.tok = self.tok[:0]
        self.pos = self.pos[:0]
        return self.forward(prompt.input_ids)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, mask: Tensor | None = None,
                *, hidden: bool = False, attentions: bool = False) -> StepOutput:
        s, q = self.seq_len, len(tokens)
        if positions is None:
            positions = s + torch.arange(q)
        if mask is None:
            mask = torch.ones(q, s + q, dtype=torch.bool).tril(s)
        assert mask.shape == (q, s + q) and positions.shape == (q,)
        self.tok = torch.cat([self.tok, tokens.long()])
        self.pos = torch.cat([self.pos, positions.long()])
        return StepOutput(self.lm.logits(self.tok, self.pos, positions, mask))

    def keep(self, start: int, indices: Tensor) -> None:
        sel = torch.cat([torch.arange(start), start + indices.long()])
        self.tok, self.pos = self.tok[sel], self.pos[sel]

    def crop(self, length: int) -> None:
        self.tok, self.pos = self.tok[:length], self.pos[:length]


class FnDrafter:
    """A Drafter whose logits are ``fn(committed tokens + node path)``; one forward per call."""

    needs_target_hidden = False

    def __init__(self, fn: Callable[[list[int]], Tensor], name: str):
        self.fn, self.name, self.forwards = fn, name, 0
        self.hist: list[int] = []
        self.paths: list[list[int]] = []

    def begin(self, prompt: PromptInputs, target_prefill: StepOutput) -> None:
        self.hist, self.paths = prompt.input_ids.tolist(), []

    def commit(self, tokens: list[int], hidden: Tensor | None) -> None:
        self.hist, self.paths = self.hist + tokens, []

    def root(self) -> Tensor:
        self.forwards += 1
        return self.fn(self.hist)

    def expand(self, tokens: Tensor, parents: Tensor) -> Tensor:
        self.forwards += 1
        rows = []
        for t, p in zip(tokens.tolist(), parents.tolist()):
            self.paths.append((self.paths[p] if p >= 0 else []) + [t])
            rows.append(self.fn(self.hist + self.paths[-1]))
        return torch.stack(rows)


def rule_drafter(vocab: int, rule: Callable[[list[int]], dict[int, float]], name: str) -> FnDrafter:
    """Logits log(p) from ``rule(seq)`` = {token: prob}; other tokens share the rest equally."""
    def fn(seq: list[int]) -> Tensor:
        probs = rule(seq)
        rest = (1 - sum(probs.values())) / (vocab - len(probs))
        p = torch.full((vocab,), rest, dtype=torch.float64)
        for t, v in probs.items():
            p[t] = v
        return p.log()
    return FnDrafter(fn, name)


def successor(overrides: dict[int, dict[int, float]], vocab: int = 12) -> Callable:
    """After token a: {a + 1: 0.9} unless ``overrides[a]`` says otherwise."""
    return lambda seq: overrides.get(seq[-1], {(seq[-1] + 1) % vocab: 0.9})


def start(cascade: CascadeDrafter, prompt: list[int], root: int) -> None:
    cascade.begin(PromptInputs(torch.tensor(prompt)), StepOutput(torch.zeros(len(prompt), 12)))
    cascade.commit([root], None)


def greedy_reference(lm: TinyLM, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(lm.next_logits(seq).argmax()))
    return seq[len(prompt):]


# ---------------------------------------------------------------- configuration
def test_config_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="square"):
        CascadeConfig(((1, 2),))
    with pytest.raises(ValueError, match=r"k_matrix\[1\]\[0\] = 3"):
        CascadeConfig(((1, 2), (3, 1)))
    with pytest.raises(ValueError, match="no token"):
        CascadeConfig(((0, 0), (0, 1)))
    with pytest.raises(ValueError, match="lenience"):
        CascadeConfig(((1,),), lenience=0.5)
    with pytest.raises(ValueError, match=r"2 x 2 but 1 drafts"):
        CascadeDrafter([MaGDrafter(12)], CascadeConfig(((1, 2), (0, 1))))
    assert CascadeConfig.of(torch.tensor([[5, 10], [0, 10]]), 3).k_matrix == ((5, 10), (0, 10))
    assert isinstance(CascadeDrafter([MaGDrafter(12)], CascadeConfig(((1,),))), Drafter)


def test_published_defaults_fill_what_is_not_given():
    # CS Drafting's README / main.py configurations, by the number of drafts
    assert CascadeConfig.published(1) == CascadeConfig(((10,),), 1.0)
    assert CascadeConfig.published(2) == CascadeConfig(((13, 10), (0, 10)), 3.0)
    assert CascadeConfig.published(3).k_matrix == ((5, 14, 10), (0, 1, 10), (0, 0, 10))
    assert CascadeConfig.published(2, [[4, 2], [0, 3]]).lenience == 3.0
    assert CascadeConfig.published(2, lenience=1.5).k_matrix == ((13, 10), (0, 10))
    with pytest.raises(ValueError, match="give both"):
        CascadeConfig.published(4)


def test_bottom_tokens_makes_the_bottom_draft_propose_a_fixed_chunk():
    # the published bottom draft always proposes 10 (_MAG_GENERATION), overshooting quota 4;
    # ours proposes exactly the missing quota
    b = rule_drafter(12, successor({}), "B")
    exact = CascadeDrafter([b], CascadeConfig(((4,),)))
    start(exact, [7], root=0)
    assert exact.propose_chain() == [1, 2, 3, 4]
    fixed = CascadeDrafter([rule_drafter(12, successor({}), "B")],
                           CascadeConfig(((4,),), bottom_tokens=10))
    start(fixed, [7], root=0)
    assert fixed.propose_chain() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]


# ---------------------------------------------------------------- hand-traced cascades
def test_depth2_vertical_then_horizontal():
    # A prefers a+1 except after 2, where it prefers 5; B (bottom) always proposes a+1.
    a = rule_drafter(12, successor({2: {5: 0.8}}), "A")
    b = rule_drafter(12, successor({}), "B")
    cascade = CascadeDrafter([a, b], CascadeConfig(((1, 3), (0, 2))))
    start(cascade, [7, 8], root=0)
    # target level, A's quota 1: A reviews B's 2 tokens [1, 2], accepts both, adds its 5;
    # then B fills the quota 1 + 3 = 4 with one token after 5: 6
    assert cascade.propose_chain() == [1, 2, 5, 6]
    counts = cascade.counts()
    assert counts.reviews == [1, 0] and counts.chain_lengths == [4]
    # A: root + one expand of [1, 2]; B: root, expand [1], expand [2, 5]
    assert counts.forwards == [2, 3]
    assert cascade.propose_chain() == [1, 2, 5, 6] and cascade.counts().forwards == [2, 3]


def test_depth3_vertical_cascade_and_horizontal_split():
    a = rule_drafter(12, successor({2: {9: 0.8}}), "A")
    b = rule_drafter(12, successor({}), "B")
    c = rule_drafter(12, successor({}), "C")
    k = ((2, 2, 1), (0, 1, 2), (0, 0, 2))
    cascade = CascadeDrafter([a, b, c], CascadeConfig(k))
    start(cascade, [4], root=0)
    # A (quota 2) reviews B's step [1, 2, 3] (B reviewed C's [1, 2] and added 3); A rejects 3
    # after 2 and adds 9 -> [1, 2, 9]. B (quota 2 + 2) then steps after 9: C proposes [10, 11],
    # B accepts and adds 0 -> [10, 11, 0]. 6 >= 5 leaves nothing for C at the target level.
    assert cascade.propose_chain() == [1, 2, 9, 10, 11, 0]
    assert cascade.counts().reviews == [1, 2, 0]


def test_lenience_accepts_a_likely_token_that_is_not_the_argmax():
    # after 1, A's argmax is 4 (0.5) but B's proposal 2 has 0.4; B is one-hot (MaG-like)
    a = rule_drafter(12, successor({1: {4: 0.5, 2: 0.4}}), "A")
    def one_hot_successor(seq: list[int]) -> Tensor:
        row = torch.full((12,), float("-inf"))
        row[(seq[-1] + 1) % 12] = 0.0
        return row
    b = FnDrafter(one_hot_successor, "B")
    chains = {}
    for lenience in (1.0, 2.0, 3.0):
        cascade = CascadeDrafter([a, b], CascadeConfig(((1, 0), (0, 2)), lenience))
        start(cascade, [7], root=0)
        chains[lenience] = (cascade.propose_chain(), cascade.counts().lenient_accepts)
    assert chains[1.0] == ([1, 4], 0)        # argmax only
    assert chains[2.0] == ([1, 4], 0)        # 0.4 > 1 / 2 fails
    assert chains[3.0] == ([1, 2, 3], 1)     # 0.4 > 1 / 3 passes; A then adds its own 3


def test_lenience_divides_the_proposing_drafts_own_probability():
    # B proposes 2 after 1 with probability 0.6 (its step's probability); A gives 2 only 0.25.
    a = rule_drafter(12, successor({1: {4: 0.5, 2: 0.25}}), "A")
    b = rule_drafter(12, successor({1: {2: 0.6}}), "B")
    c = rule_drafter(12, successor({}), "C")
    k = ((1, 0, 0), (0, 2, 0), (0, 0, 1))
    got = {}
    for lenience in (2.0, 3.0):
        cascade = CascadeDrafter([a, b, c], CascadeConfig(k, lenience))
        start(cascade, [7], root=0)
        got[lenience] = cascade.propose_chain()
    assert got[2.0][:2] == [1, 4]  # 0.25 > 0.6 / 2 fails
    assert got[3.0][:2] == [1, 2]  # 0.25 > 0.6 / 3 passes (with p_prop = 1 it would fail)


def test_replay_through_root_and_expand_extends_past_the_chain():
    a = rule_drafter(12, successor({2: {5: 0.8}}), "A")
    cascade = CascadeDrafter([a, MaGDrafter(12)], CascadeConfig(((1, 1), (0, 2))))
    start(cascade, [3, 1, 2, 5], root=0)
    chain = cascade.propose_chain()
    tree = ChainBuilder(ChainConfig(k=len(chain) + 3))(cascade, SamplingConfig())
    assert tree.tokens.tolist()[:len(chain)] == chain
    # beyond the chain: what a cascade proposes once the chain is committed
    fresh = CascadeDrafter([rule_drafter(12, successor({2: {5: 0.8}}), "A"), MaGDrafter(12)],
                           CascadeConfig(((1, 1), (0, 2))))
    start(fresh, [3, 1, 2, 5], root=0)
    fresh.commit(chain, None)
    beyond, fresh_chain = tree.tokens.tolist()[len(chain):], fresh.propose_chain()
    n = min(3, len(fresh_chain))
    assert n > 0 and beyond[:n] == fresh_chain[:n]
    assert CascadeBuilder()(cascade, SamplingConfig()).tokens.tolist() == chain


# ---------------------------------------------------------------- end to end over a fake target
VOCAB = 16
TARGET = TinyLM(VOCAB, seed=1)  # its greedy outputs repeat only after long stretches
PROMPTS = [torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(s)).tolist()
           for s in range(3)]
N_NEW = 32


@functools.cache
def _bigram() -> BigramTable:  # a "corpus" of the target's text on other prompts
    corpus = [greedy_reference(TARGET, [s, (s * 7) % VOCAB], 20) for s in range(3)]
    return BigramTable.from_token_ids(corpus, VOCAB)


def _mag() -> MaGDrafter:
    return MaGDrafter(VOCAB, _bigram())


def _model(noise: float, seed: int) -> FnDrafter:
    lm = TARGET.perturbed(noise, seed)
    return FnDrafter(lm.next_logits, f"draft{seed}")


CASES = {  # name: (drafts factory, k_matrix)
    "mag": (lambda: [_mag()], ((4,),)),
    "model+mag": (lambda: [_model(0.3, 1), _mag()], ((3, 2), (0, 4))),
    "model+model+mag": (lambda: [_model(0.3, 1), _model(0.8, 2), _mag()],
                        ((3, 4, 2), (0, 1, 3), (0, 0, 3))),
}


@pytest.mark.parametrize("builder", ["cascade", "chain"])
@pytest.mark.parametrize("lenience", [1.0, 3.0])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_output_equals_the_targets_own(case: str, lenience: float, builder: str):
    make, k = CASES[case]
    cfg = GenerationConfig(max_new_tokens=N_NEW)
    accepted, rejected, lenient = 0, 0, 0
    for prompt in PROMPTS:
        p = PromptInputs(torch.tensor(prompt))
        ref = generate(FakeTarget(TARGET), p, cfg).tokens
        assert ref == greedy_reference(TARGET, prompt, N_NEW)
        assert isinstance(FakeTarget(TARGET), ModelAdapter)
        cascade = CascadeDrafter(make(), CascadeConfig(k, lenience))
        tree_builder = CascadeBuilder() if builder == "cascade" else ChainBuilder(ChainConfig(k=5))
        res = generate(FakeTarget(TARGET), p, cfg, cascade, tree_builder)
        assert res.tokens == ref, f"{case} L={lenience} prompt {prompt}"
        accepted += sum(s.accepted for s in res.stats.steps)
        rejected += sum(s.accepted < s.tree_size for s in res.stats.steps)
        lenient += cascade.counts().lenient_accepts
    assert accepted > 0 and rejected > 0  # partial acceptance was exercised
    if len(k) > 1:  # lenience acts only where a draft reviews
        assert (lenient > 0) == (lenience > 1)


def test_sampled_output_follows_the_target_distribution():
    lm = TinyLM(5, seed=3, decay=0.6)
    draft = lm.perturbed(0.8, 4)
    prompt = [1, 3, 0, 2]
    probs = lambda seq: torch.softmax(lm.next_logits(seq), -1)  # noqa: E731
    exact = torch.zeros(5, 5, dtype=torch.float64)  # joint of the 2nd and 3rd tokens
    for t1 in range(5):
        p1 = probs(prompt)[t1]
        p2 = probs(prompt + [t1])
        for t2 in range(5):
            exact[t2] += p1 * p2[t2] * probs(prompt + [t1, t2])
    n, counts, drafted = 800, Counter(), 0
    sampling = SamplingConfig(temperature=1.0)
    for seed in range(n):
        cascade = CascadeDrafter([FnDrafter(draft.next_logits, "d"), MaGDrafter(5)],
                                 CascadeConfig(((2, 1), (0, 2))))
        cfg = GenerationConfig(max_new_tokens=3, sampling=sampling, seed=seed)
        res = generate(FakeTarget(lm), PromptInputs(torch.tensor(prompt)), cfg, cascade,
                       CascadeBuilder())
        counts[tuple(res.tokens[1:3])] += 1
        drafted += sum(s.accepted for s in res.stats.steps)
    observed = torch.tensor([counts[(a, b)] for a in range(5) for b in range(5)],
                            dtype=torch.float64)
    expected = exact.flatten() * n
    keep = expected >= 5  # merge the rare cells into one
    obs = torch.cat([observed[keep], observed[~keep].sum(0, keepdim=True)])
    exp = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
    assert drafted > n // 4  # drafts were accepted, so the test exercises verification
    assert chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-3


# ---------------------------------------------------------------- csd() and costs
def test_csd_entry_point_mirrors_the_published_call():
    prompt = torch.tensor([PROMPTS[0]])  # [1, T], as the published code passes it
    res = csd([_model(0.3, 1), _mag()], FakeTarget(TARGET), prompt, [[3, 2], [0, 4]],
              max_length=30, leniency=2)
    assert res.tokens == greedy_reference(TARGET, PROMPTS[0], 30)
    assert res.stats.draft_forwards > 0 and res.stats.tau > 1


def test_cascade_cost_in_published_units():
    big = _model(0.3, 1)
    big.name = "JackFram/llama-160m"
    cascade = CascadeDrafter([big, _mag()], CascadeConfig.of([[3, 2], [0, 4]], 2))
    res = generate(FakeTarget(TARGET), PromptInputs(torch.tensor(PROMPTS[0])),
                   GenerationConfig(max_new_tokens=30), cascade, CascadeBuilder())
    report = cascade_cost(res, cascade, "llama-7b", "model_parameters")
    reviews = cascade.counts().reviews
    assert reviews[0] > 0 and reviews[1] == 0  # MaG never reviews and costs nothing
    assert report.total == res.stats.target_forwards * 70000 + reviews[0] * 160
    assert report.autoregressive == 30 * 70000
    assert report.speedup == pytest.approx(report.autoregressive / report.total)
    forwards = cascade_cost(res, cascade, "llama-7b", counting="forwards")
    # real calls also count each step's root() forward
    assert forwards.counts["JackFram/llama-160m"] == cascade.counts().forwards[0] > reviews[0]
    assert sum(cascade.counts().forwards) == res.stats.draft_forwards


def test_unit_cost_follows_the_published_substring_order():
    assert unit_cost("google/flan-t5-xxl") == 11300
    assert unit_cost("google/flan-t5-xl") == 3000
    assert unit_cost("google/flan-t5-small", "previous_work") == 0.02
    assert unit_cost("my-draft", overrides={"my-draft": 5}) == 5
    with pytest.raises(ValueError, match="'my-draft'"):
        unit_cost("my-draft")
    with pytest.raises(ValueError, match="counter_version"):
        unit_cost("xxl", "walltime")
    report = simulate_cost("google/flan-t5-xxl", 10, {"google/flan-t5-small": 7, "mag": 0}, 25,
                           "previous_work")
    assert report.total == pytest.approx(10 * 1 + 7 * 0.02)
    assert report.speedup == pytest.approx(25 / report.total)
    assert set(COST_TABLES) == {"model_parameters", "previous_work"}

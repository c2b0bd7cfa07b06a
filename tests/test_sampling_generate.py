"""Sampling through ``generate()`` follows the target's own autoregressive distribution.

Real drafters on tiny 1-layer LLaVA and Qwen2-VL targets with a 13/16-token vocabulary
(``small_vocab_tokenizer``), sampled at temperature 0.7 with top-k 6 and top-p 0.95: a draft VLM
(a noisy copy of the target with sharpened logits, see ``build_suite``) and an MSD head (the
target's layer, noisy, see ``close_head``), through chains of one token (Leviathan rule; the
bonus token after an accepted draft is t3), sampled trees (Sequoia rule: 4 siblings at the
root, 2 under each of the first two) and top-k trees (EAGLE-2 rule, ``DynamicBuilder``). Each draw is one ``generate()`` call (its own seed,
``max_new_tokens=3``, no EOS); the prefill is replayed from a cached forward (``Replay``), the
decode steps are the real ones.

The reference is computed independently of the code under test: the target's logits from
Hugging Face's own forward (its prefill of the prompt with the images, then each prompt + [a]
and prompt + [a, b] on a copy of its cache: no adapter, none of our KV code), processed by a
numpy re-implementation of temperature, top-k and top-p. Chi-square on the first speculative
token t2 (its marginal), on the joint (t1, t2) (t1 comes from prefill) and on the joint
(t2, t3) (the first two tokens the decode steps emit); cells expecting < 5 draws are pooled, a
token of zero probability fails at once. A regime passes when all three p-values exceed 1e-3.

Power at ``DRAWS`` = 1200 per regime (``mutants.py`` names the mutants):
- ``target_ignores_sampling`` (the target's rows in verification are a plain softmax): the
  output then follows the unfiltered target, which gives tokens outside top-k / top-p
  probability 0.23 (LLaVA) / 0.25 (Qwen2-VL) at t2, computed from the same reference forwards;
  a zero-probability token fails the test, so the chance of missing it is (1 - 0.23)^1200
  < 1e-130 in any regime.
- ``shared_sibling_coin`` (one uniform reused by the sampled siblings of a slot, Sequoia rule):
  only sampled trees see it, and only where a later sibling's p'/q' lies strictly between 0
  and 1. Estimated by simulation (``python -m lmms_sd.testing.mutants --only
  shared_sibling_coin --power llava-draft_vlm-sampled_tree --draws 2000``: 2000 draws of the
  mutated code give the mutant's distribution, the non-central chi-square gives the power):
  0.54 at 1200 draws for the (t1, t2) joint of the LLaVA regime alone (p-values of those 2000
  mutant draws: 2e-4, 4e-7, 4e-5); the Qwen2-VL sampled-tree regime adds its own chance (not
  estimated). Hence CI (``tests/test_mutants.py``) runs the EAGLE-rule variant below, and the
  mutation script runs both sampled-tree regimes at 2000 draws (``HEAVY_DRAWS``).
- ``shared_sibling_coin_point_mass`` (the same in the EAGLE rule): the second sibling's
  acceptance drops from p2 / (1 - p1) to (p2 / (1 - p1) - p1) / (1 - p1): caught at 400 draws
  (``tests/test_mutants.py``).

``LMMS_SD_STAT_DRAWS`` sets the draws; ``LMMS_SD_STAT_FULL=1`` (set by the mutation script)
adds regimes so that each drafter meets each tree in some family.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pytest
import torch

from lmms_sd.adapters import HFAdapter, load_adapter
from lmms_sd.core.generate import GenerationConfig, generate
from lmms_sd.core.interfaces import Drafter, PromptInputs, StepOutput
from lmms_sd.core.sampling import SamplingConfig
from lmms_sd.drafters.model import ModelDrafter
from lmms_sd.drafters.msd import MSDConfig, MSDDrafter, qwen2_vl_rope_index
from lmms_sd.drafters.msd_format import new_msd_head
from lmms_sd.drafters.msd_head import MSDHead
from lmms_sd.testing.tiny import FAMILIES, build_tiny_suite, small_vocab_tokenizer, tiny_image
from lmms_sd.trees import ChainBuilder, ChainConfig, DynamicBuilder, DynamicConfig, StaticBuilder
from lmms_sd.trees.growmap import TreeShape
from test_tree_verify_stats import pvalue

SAMPLING = SamplingConfig(temperature=0.7, top_k=6, top_p=0.95)
DRAWS = int(os.environ.get("LMMS_SD_STAT_DRAWS", "1200"))
PASS_P = 1e-3
SAMPLED_TREE = TreeShape((-1, -1, -1, -1, 0, 0, 1, 1))
NOISE = 0.05  # relative noise of the drafts' weights
SHARPEN = 1.6  # the draft VLM's logits are the (noisy) target's times this


# ---------------------------------------------------------------------------- the models

class Replay:
    """An adapter whose ``prefill`` replays one cached prefill of ``prompt``: the cache is cropped
    back to the prompt (decode steps only write after it) and the cached output returned."""

    def __init__(self, adapter: HFAdapter, prompt: PromptInputs):
        self.adapter, self.prompt = adapter, prompt
        self.out = adapter.prefill(prompt, hidden=True, embeds=True)
        self.length = adapter.seq_len

    def prefill(self, prompt: PromptInputs, *, hidden: bool = False,
                embeds: bool = False) -> StepOutput:
        assert prompt is self.prompt, "Replay serves one prompt"
        self.adapter.crop(self.length)
        return self.out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.adapter, name)


@dataclass
class Suite:
    target: HFAdapter
    draft_vlm: HFAdapter
    prompt: PromptInputs


@torch.no_grad()
def build_suite(root: Path, family: str) -> Suite:
    """A 1-layer target; the draft VLM is a noisy copy of it with its logits times SHARPEN:
    close to the target, as a trained draft is, and over-confident, as small drafts are. Then
    a likely first sibling is often rejected (p/q well inside (0, 1)) and a later one accepted
    with p'/q' strictly between 0 and 1: where a reused coin shows most."""
    paths = build_tiny_suite(root, family, seed=0, tokenizer=small_vocab_tokenizer(family),
                             target_layers=1)
    target, draft = load_adapter(paths["target"]), load_adapter(paths["target"])
    perturb(draft.model.parameters(), seed=2)
    draft.lm_head.weight.mul_(SHARPEN)
    return Suite(target, draft, target.prepare("w1 w2 w3", [tiny_image(0)]))


@torch.no_grad()
def perturb(params: Iterable[torch.Tensor], seed: int, scale: float = NOISE) -> None:
    """Add Gaussian noise of ``scale`` times each tensor's own spread (or 1 for constants)."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        spread = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 1.0
        p += scale * spread * torch.randn(p.shape, generator=gen)


class Suites(dict):
    """family -> Suite, built on first use (a mutant's run selects one family)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> Suite:
        self[family] = build_suite(self.root, family)
        return self[family]


@pytest.fixture(scope="module")
def suites(tmp_path_factory: pytest.TempPathFactory) -> Suites:
    return Suites(tmp_path_factory.mktemp("small_vocab"))


def make_drafter(kind: str, suite: Suite) -> Drafter:
    if kind == "draft_vlm":
        return ModelDrafter(Replay(suite.draft_vlm, suite.prompt), vocab_size=suite.target.vocab_size)
    model = suite.target.model
    qwen = suite.target.family == "qwen2_vl"
    return MSDDrafter(close_head(suite.target), MSDConfig(), qwen2_vl_rope_index(model) if qwen else None)


@torch.no_grad()
def close_head(target: HFAdapter) -> MSDHead:
    """An MSD head near the 1-layer target: fc passes the token embedding through, the layer is
    a noisy copy of the target's (a Llama head has no input norm), no final norm."""
    torch.manual_seed(1)
    head = new_msd_head(target.model)
    hidden = head.fc.out_features
    head.fc.weight.zero_()
    head.fc.weight[:, :hidden] = torch.eye(hidden)
    head.fc.bias.zero_()
    head.layers[0].load_state_dict(target.decoder.layers[0].state_dict(), strict=False)
    perturb(head.layers.parameters(), seed=3)
    return head


# ---------------------------------------------------------------------------- the reference

def processed(logits: np.ndarray, s: SamplingConfig) -> np.ndarray:
    """# [V] logits -> the distribution decoding samples from: temperature, then the top_k
    largest, then the smallest set of largest probabilities whose mass reaches top_p."""
    x = logits.astype(np.float64) / s.temperature
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(len(x), dtype=bool)
    keep[order[: s.top_k or len(x)]] = True
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    mass = np.cumsum(p[order]) - p[order]  # mass of the larger tokens before each
    p[order[mass >= s.top_p]] = 0.0
    return p / p.sum()


class HFNext:
    """The target's logits after prompt + ``extra`` # [V], from Hugging Face's own forward: one
    prefill of the prompt with the images, then ``extra`` on a copy of that cache (no adapter,
    none of our KV code; Qwen2-VL takes its M-RoPE delta from its own prefill)."""

    @torch.no_grad()
    def __init__(self, target: HFAdapter, prompt: PromptInputs):
        self.model = target.model
        ids = prompt.input_ids[None]
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                         **prompt.model_kwargs)
        self.first, self.cache = out.logits[0, -1].double().numpy(), out.past_key_values

    @torch.no_grad()
    def __call__(self, extra: list[int]) -> np.ndarray:
        if not extra:
            return self.first
        ids = torch.tensor([extra], dtype=torch.long)
        out = self.model(input_ids=ids, cache=copy.deepcopy(self.cache), use_cache=True)
        return out.logits[0, -1].double().numpy()


@dataclass(frozen=True)
class Reference:
    p12: np.ndarray  # [V, V] P(t1 = a, t2 = b)
    p23: np.ndarray  # [V, V] P(t2 = b, t3 = c)


def reference(target: HFAdapter, prompt: PromptInputs, s: SamplingConfig) -> Reference:
    V, next_logits = target.vocab_size, HFNext(target, prompt)
    p1 = processed(next_logits([]), s)
    p12, p123 = np.zeros((V, V)), np.zeros((V, V, V))
    for a in np.flatnonzero(p1):
        p12[a] = p1[a] * processed(next_logits([a]), s)
        for b in np.flatnonzero(p12[a]):
            p123[a, b] = p12[a, b] * processed(next_logits([a, b]), s)
    return Reference(p12, p123.sum(0))


# ---------------------------------------------------------------------------- the draws

@dataclass
class Draws:
    c12: np.ndarray   # [V, V] counts of (t1, t2)
    c23: np.ndarray   # [V, V] counts of (t2, t3)
    branching: int    # verify steps whose tree has a slot with two or more children


def draw(suite: Suite, drafter_kind: str, builder: Callable, n: int, seed: int = 0) -> Draws:
    V = suite.target.vocab_size
    target = Replay(suite.target, suite.prompt)
    drafter = make_drafter(drafter_kind, suite)
    c12, c23 = np.zeros((V, V), dtype=np.int64), np.zeros((V, V), dtype=np.int64)
    branching = 0

    def watch(tree, logits, verdict) -> None:
        nonlocal branching
        branching += any(len(c) > 1 for c in tree.children)

    for i in range(n):
        cfg = GenerationConfig(max_new_tokens=3, sampling=SAMPLING, seed=seed + i)
        t = generate(target, suite.prompt, cfg, drafter, builder, observer=watch).tokens
        c12[t[0], t[1]] += 1
        c23[t[1], t[2]] += 1
    return Draws(c12, c23, branching)


def pvalues(d: Draws, ref: Reference) -> dict[str, float]:
    return {"t2": pvalue(d.c12.sum(0), ref.p12.sum(0)), "t1,t2": pvalue(d.c12, ref.p12),
            "t2,t3": pvalue(d.c23, ref.p23)}


def power(ref: np.ndarray, counts: np.ndarray, n: int, alpha: float = PASS_P) -> float:
    """The chance that ``pvalue`` of n draws from the distribution behind ``counts`` (a large
    sample of a mutant's output) falls to ``alpha`` or below: 1 - P(no zero-probability token
    in n draws) * P(non-central chi-square <= critical value), with the non-centrality
    n * sum((p' - p)^2 / p) over the cells ``pvalue`` keeps (bias-corrected for the sampling
    noise of p')."""
    from scipy.stats import chi2, ncx2

    ref, counts = ref.ravel() / ref.sum(), counts.ravel().astype(np.float64)
    m = counts.sum()
    alt = counts / m
    outside = alt[ref == 0].sum()
    big = n * ref >= 5
    cells_p = list(ref[big]) + ([ref[~big].sum()] if ref[~big].sum() > 0 else [])
    cells_q = list(alt[big]) + ([alt[(~big) & (ref > 0)].sum()] if ref[~big].sum() > 0 else [])
    p, q = np.array(cells_p), np.array(cells_q) / max(1e-300, sum(cells_q))
    distance = ((q - p) ** 2 / p).sum() - (q * (1 - q) / (m * p)).sum()
    df = len(p) - 1
    stay = ncx2.cdf(chi2.isf(alpha, df), df, n * max(distance, 1e-12))
    return float(1 - (1 - outside) ** n * stay)


def power_report(regime: str, n: int, at: int = DRAWS) -> None:
    """Print the power at ``at`` draws of each test of ``regime`` ("llava-msd-sampled_tree"),
    estimated from ``n`` draws of the code on ``sys.path`` (a mutated copy: see mutants.py)."""
    import tempfile

    family, drafter, tree = regime.split("-")
    suite = build_suite(Path(tempfile.mkdtemp()), family)
    ref = reference(suite.target, suite.prompt, SAMPLING)
    d = draw(suite, drafter, BUILDERS[tree], n, seed=10_000)
    tests = {"t2": (ref.p12.sum(0), d.c12.sum(0)), "t1,t2": (ref.p12, d.c12),
             "t2,t3": (ref.p23, d.c23)}
    print(regime, f"{n} draws:", {k: pvalue(c, r) for k, (r, c) in tests.items()})
    print(regime, f"power at {at} draws:", {k: power(r, c, at) for k, (r, c) in tests.items()})


BUILDERS = {
    "chain": ChainBuilder(ChainConfig(k=1)),  # Leviathan; k=1 so the bonus token is t3
    "sampled_tree": StaticBuilder(SAMPLED_TREE),                          # Sequoia siblings
    "topk_tree": DynamicBuilder(DynamicConfig(depth=1, top_k=3, total_tokens=6)),  # EAGLE-2
}
REGIMES = [  # (family, drafter, tree): both families, both drafters, every kind of tree
    ("llava", "msd", "chain"), ("llava", "draft_vlm", "sampled_tree"),
    ("qwen2_vl", "draft_vlm", "sampled_tree"), ("qwen2_vl", "msd", "topk_tree"),
]
if os.environ.get("LMMS_SD_STAT_FULL"):  # the heavy variant: each drafter with each tree
    REGIMES += [("llava", "draft_vlm", "topk_tree"), ("qwen2_vl", "draft_vlm", "chain"),
                ("qwen2_vl", "msd", "sampled_tree")]


@pytest.mark.parametrize("family,drafter,tree", REGIMES, ids=["-".join(r) for r in REGIMES])
def test_generate_samples_the_target_distribution(suites: Suites, family: str,
                                                  drafter: str, tree: str) -> None:
    suite = suites[family]
    ref = reference(suite.target, suite.prompt, SAMPLING)
    d = draw(suite, drafter, BUILDERS[tree], DRAWS)
    p = pvalues(d, ref)
    assert min(p.values()) > PASS_P, p
    if tree != "chain":  # the regime did exercise sibling slots
        assert d.branching >= DRAWS, d.branching


def test_reference_is_not_degenerate(suites: Suites) -> None:
    # the filters bite (some but not all tokens survive), no token dominates
    for suite in (suites[f] for f in FAMILIES):
        ref = reference(suite.target, suite.prompt, SAMPLING)
        support = (ref.p12.sum(1) > 0).sum()
        assert 2 <= support <= SAMPLING.top_k < suite.target.vocab_size, support
        assert ref.p12.max() < 0.5

"""End-to-end greedy losslessness: for every (drafter, tree) row, on every target family
(``FAMILIES``: LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision) and every prompt,
speculative output is token-identical to the target's own ``generate``.

The scripted drafter proposes the target's own continuation for ``good`` tokens and then a
wrong one, so partial acceptance happens at every step; real drafts (a random small VLM, a
text-only LM) mostly get rejected. Trees put the right token at non-first siblings too.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from lmms_sd.adapters import HFAdapter
from lmms_sd.adapters.base import extend_prompt
from lmms_sd.core.generate import GenerationConfig, GenerationStats, generate
from lmms_sd.core.interfaces import PromptInputs
from lmms_sd.drafters.cascade import CascadeConfig, CascadeDrafter
from lmms_sd.drafters.eagle3 import MROPE_HEADS, Eagle3Config, Eagle3Drafter, bind_target_states
from lmms_sd.drafters.eagle3_format import new_eagle3_head
from lmms_sd.drafters.msd import qwen2_vl_rope_index
from lmms_sd.drafters.model import ModelDrafter
from lmms_sd.drafters.ngram import MaGDrafter
from lmms_sd.testing.scripted import ScriptedDrafter, ScriptedTreeDrafter
from lmms_sd.testing.tiny import FAMILIES
from lmms_sd.trees import make_builder

MAX_NEW = 24


@dataclass(frozen=True)
class Row:
    drafter: str          # draft_vlm | text_only | scripted:<good>
    tree: str             # builder name
    params: tuple = ()    # builder settings as (key, value) pairs

    def __str__(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.params)
        return f"{self.drafter}-{self.tree}{'(' + extra + ')' if extra else ''}"


ROWS = [
    Row("draft_vlm", "chain", (("k", 1),)),
    Row("draft_vlm", "chain", (("k", 4),)),
    Row("text_only", "chain", (("k", 3),)),
    Row("scripted:0", "chain", (("k", 3),)),
    Row("scripted:2", "chain", (("k", 4),)),
    Row("scripted:5", "chain", (("k", 5),)),   # every draft accepted: bonus tokens
    Row("scripted:3", "chain", (("k", 8),)),
    Row("draft_vlm", "dynamic", (("depth", 3), ("top_k", 3), ("total_tokens", 10))),
    Row("text_only", "dynamic", (("depth", 4), ("top_k", 2), ("total_tokens", 8))),
    Row("scripted:2", "dynamic", (("depth", 4), ("top_k", 2), ("total_tokens", 8))),
    Row("draft_vlm", "opt", (("nodes", 8), ("threshold", 0.1), ("max_depth", 4))),
    Row("scripted:3", "opt", (("nodes", 6), ("threshold", 0.0), ("max_depth", 5))),
    Row("draft_vlm", "static", (("acceptance", "0.6,0.3,0.1"), ("budget", 10), ("max_depth", 4))),
    Row("scripted:1", "static", (("acceptance", "0.6,0.3"), ("budget", 8), ("max_depth", 5))),
    Row("mag", "chain", (("k", 3),)),
    Row("mag", "dynamic", (("depth", 3), ("top_k", 2), ("total_tokens", 6))),
    Row("cascade:draft_vlm,mag:2,2;0,3:1", "cascade"),
    Row("cascade:draft_vlm,text_only,mag:2,1,1;0,2,2;0,0,2:3", "cascade"),
    Row("cascade:text_only,mag:3,1;0,2:2", "chain", (("k", 4),)),
    Row("eagle3", "chain", (("k", 4),)),
    Row("eagle3", "dynamic", (("depth", 4), ("top_k", 3), ("total_tokens", 12))),
    Row("eagle3_decoupled", "dynamic", (("depth", 3), ("top_k", 2), ("total_tokens", 8))),
    Row("eagle3", "opt", (("nodes", 8), ("threshold", 0.1), ("max_depth", 4))),
    Row("eagle3_decoupled", "static", (("acceptance", "0.6,0.3"), ("budget", 8), ("max_depth", 4))),
]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """Every family here (the suite's ``family`` covers the two original ones)."""
    return request.param


@pytest.fixture(scope="module")
def references(every_tiny_adapters) -> dict[str, list[tuple[PromptInputs, list[int]]]]:
    from conftest import greedy_references

    return greedy_references(every_tiny_adapters, MAX_NEW)


_FITTED: dict[int, object] = {}
EAGLE3_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl")  # the layer kinds an EAGLE-3 head has


def skip_unless_eagle3(family: str) -> None:
    if family not in EAGLE3_FAMILIES:
        pytest.skip(f"no EAGLE-3 head of {family}'s architecture yet (lmms_sd.drafters.eagle3)")


def fitted_eagle3(target: HFAdapter, references, decouple: bool
                  ) -> tuple[HFAdapter, Eagle3Drafter]:
    """A random EAGLE-3 head whose lm_head is fitted (200 Adam steps, ~1 s) to the target's
    own continuations of the test prompts from the head's states at committed positions, so
    root drafts are mostly right and deeper ones (fed predicted features) often wrong; and a
    view of the target returning the head's states (the shared adapter is left as it is)."""
    view = copy.copy(target)
    key = id(target.model)
    if key not in _FITTED:
        torch.manual_seed(0)
        head = new_eagle3_head(view.model, torch.arange(1, view.vocab_size))  # id 0 never drafted
        bind_target_states(view, head)
        feats, labels = [], []
        for prompt, reference in references:
            ids = torch.cat([prompt.input_ids, torch.tensor(reference[:-1])])
            hidden = view.prefill(extend_prompt(prompt, torch.tensor(reference[:-1])),
                                  hidden=True).hidden
            u = head.fuse(ids[None, 1:], hidden[None, :-1])
            n = u.shape[1]
            pos = torch.arange(1, n + 1)
            pos = pos[None] if head.kind == "llama" else pos.expand(3, 1, -1)
            with torch.no_grad():
                g = head(u, pos, torch.ones(n, n, dtype=torch.bool).tril()[None])[0]
            t = len(prompt.input_ids) - 1  # slot of the last prompt token drafts reference[0]
            feats.append(g[t - 1:])
            labels.append(torch.tensor(reference) - 1)
        x, y = torch.cat(feats), torch.cat(labels)
        opt = torch.optim.Adam(head.lm_head.parameters(), lr=0.05)
        for _ in range(200):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head.draft_logits(x), y.clamp(min=0)).backward()
            opt.step()
        _FITTED[key] = head.eval()
    head = _FITTED[key]
    bind_target_states(view, head)
    rope = qwen2_vl_rope_index(view.model) if head.kind in MROPE_HEADS else None
    return view, Eagle3Drafter(head, Eagle3Config(decouple_images=decouple), rope)


def make_drafter(kind: str, adapters: dict[str, HFAdapter], reference: list[int]):
    """``kind``: draft_vlm | text_only | mag | scripted:<good> |
    cascade:<draft,...>:<k_matrix rows ';'-separated>:<lenience>"""
    target = adapters["target"]
    if kind.startswith("scripted:"):
        return ScriptedDrafter(reference, int(kind.split(":")[1]), target.vocab_size)
    if kind == "mag":
        return MaGDrafter(target.vocab_size)
    if kind.startswith("cascade:"):
        _, names, rows, lenience = kind.split(":")
        k_matrix = [[int(v) for v in row.split(",")] for row in rows.split(";")]
        drafts = [make_drafter(n, adapters, reference) for n in names.split(",")]
        return CascadeDrafter(drafts, CascadeConfig.of(k_matrix, float(lenience)))
    return ModelDrafter(adapters[kind], text_only=kind == "text_only",
                        vocab_size=target.vocab_size)


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_greedy_speculative_equals_target_generate(row: Row, family: str, every_tiny_adapters, references):
    adapters = every_tiny_adapters[family]
    target = adapters["target"]
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=target.eos_token_ids)
    builder = make_builder(row.tree, **dict(row.params))
    if row.drafter.startswith("eagle3"):
        skip_unless_eagle3(family)
    for prompt, reference in references[family]:
        if row.drafter.startswith("eagle3"):
            target, drafter = fitted_eagle3(adapters["target"], references[family],
                                            row.drafter == "eagle3_decoupled")
        else:
            drafter = make_drafter(row.drafter, adapters, reference)
        result = generate(target, prompt, cfg, drafter, builder, decode=target.decode)
        assert result.tokens == reference, f"{row} diverged from target.generate"
        stats = result.stats
        assert stats.new_tokens == len(reference)
        assert stats.target_forwards == 1 + stats.decode_steps
        assert len(stats.origin) == len(reference) and stats.origin[0] == "target"
        assert_stats_describe_emitted(stats)


def assert_stats_describe_emitted(stats: GenerationStats) -> None:
    """Per-step counts, tau and origin count exactly the emitted tokens, after any cut."""
    accepted = [s.accepted for s in stats.steps]
    assert sum(a + 1 for a in accepted) == stats.new_tokens - 1  # the first from prefill
    assert stats.tau == pytest.approx((stats.new_tokens - 1) / max(1, stats.decode_steps))
    drafts = stats.origin.count("draft")  # the cut step may end on an accepted draft token
    assert drafts - sum(accepted) in ((0, 1) if stats.steps else (0,))
    if drafts > sum(accepted):
        assert stats.origin[-1] == "draft"
    assert stats.to_dict()["accepted_per_step"] == accepted


def test_eagle3_rows_exercise_partial_acceptance(family: str, every_tiny_adapters, references):
    """The fitted EAGLE-3 head gets drafts both accepted and rejected (so the rows above test
    the KV and feature bookkeeping of both outcomes)."""
    skip_unless_eagle3(family)
    target, drafter = fitted_eagle3(every_tiny_adapters[family]["target"], references[family],
                                    False)
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=target.eos_token_ids)
    steps = [s for prompt, _ in references[family]
             for s in generate(target, prompt, cfg, drafter, make_builder("chain", k=4)).stats.steps]
    assert any(0 < s.accepted < 4 for s in steps) and any(s.accepted == 0 for s in steps)


def test_scripted_drafter_exercises_partial_acceptance(family: str, every_tiny_adapters, references):
    adapters = every_tiny_adapters[family]
    target = adapters["target"]
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=target.eos_token_ids)
    prompt, reference = references[family][0]
    good = 2
    res = generate(target, prompt, cfg, ScriptedDrafter(reference, good, target.vocab_size),
                   make_builder("chain", k=4), decode=target.decode)
    assert res.tokens == reference
    # every full step accepted exactly `good` drafts, then the target corrected the wrong one
    assert all(s.accepted == good for s in res.stats.steps[:-1])


def test_stop_string_inside_an_accepted_block(family: str, every_tiny_adapters, references):
    """A stop string that completes in the middle of an accepted block stops decoding exactly
    where plain decoding would: on the token that completes it."""
    adapters = every_tiny_adapters[family]
    target = adapters["target"]
    prompt, reference = references[family][0]
    # choose a stop string that completes at token 10 of the reference
    text_at = [target.decode(reference[: j + 1]) for j in range(len(reference))]
    # (its text must not occur earlier, or decoding stops there, before any block)
    j = next((j for j in range(6, len(reference)) if text_at[j] != text_at[j - 1]
              and text_at[j][len(text_at[j - 1]):].strip()
              and text_at[j][len(text_at[j - 1]):] not in text_at[j - 1]), None)
    if j is None:
        pytest.skip("reference has no printable token to stop on")
    stop = text_at[j][len(text_at[j - 1]):]
    first = next(i for i in range(len(reference)) if stop in text_at[i])
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=target.eos_token_ids,
                           stop_strings=(stop,))
    ar = generate(target, prompt, cfg, decode=target.decode)
    sd = generate(target, prompt, cfg, ScriptedDrafter(reference, 8, target.vocab_size),
                  make_builder("chain", k=8), decode=target.decode)
    assert ar.tokens == sd.tokens == reference[: first + 1]
    assert sd.stats.decode_steps < ar.stats.decode_steps  # the stop fell inside one block
    assert_stats_describe_emitted(sd.stats)


def test_eos_inside_an_accepted_block(family: str, every_tiny_adapters, references):
    """Declaring a token of the reference to be EOS stops both decoders on it."""
    adapters = every_tiny_adapters[family]
    target = adapters["target"]
    prompt, reference = references[family][1]
    eos = reference[5]
    first = reference.index(eos)
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=(eos,))
    ar = generate(target, prompt, cfg)
    sd = generate(target, prompt, cfg, ScriptedDrafter(reference, 8, target.vocab_size),
                  make_builder("chain", k=8))
    assert ar.tokens == sd.tokens == reference[: first + 1]
    assert_stats_describe_emitted(sd.stats)
    assert sd.stats.steps[-1].accepted == first - 1  # cut inside its block of 9: counted to EOS


def test_stop_string_spanning_two_accepted_blocks(family: str, every_tiny_adapters, references):
    """A stop string that begins in the last token of one step's block and completes in the
    first token of the next stops both decoders on the completing token."""
    target = every_tiny_adapters[family]["target"]
    prompt, reference = references[family][0]
    good = 2  # steps emit good + 1 tokens: blocks [0], [1..3], [4..6], ...
    text_at = [target.decode(reference[: j + 1]) for j in range(len(reference))]
    for b in range(good + 2, len(reference), good + 1):  # b: the first token of a block
        stop = text_at[b][len(text_at[b - 2]):]
        if (text_at[b - 1] != text_at[b - 2] and text_at[b] != text_at[b - 1]
                and stop.strip() and not any(stop in t for t in text_at[:b])):
            break
    else:
        pytest.skip("no two-token stop string across a block boundary in the reference")
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=target.eos_token_ids,
                           stop_strings=(stop,))
    ar = generate(target, prompt, cfg, decode=target.decode)
    sd = generate(target, prompt, cfg, ScriptedDrafter(reference, good, target.vocab_size),
                  make_builder("chain", k=good + 1), decode=target.decode)
    assert ar.tokens == sd.tokens == reference[: b + 1]
    assert [s.accepted for s in sd.stats.steps][-1] == 0  # the last block: its first token
    assert_stats_describe_emitted(sd.stats)


class KeepLog:
    """A target adapter that records the indices of every ``keep`` call."""

    def __init__(self, adapter: HFAdapter):
        self.adapter, self.calls = adapter, []

    def keep(self, start: int, indices) -> None:
        self.calls.append(indices.tolist())
        self.adapter.keep(start, indices)

    def __getattr__(self, name: str):
        return getattr(self.adapter, name)


TREE_ROWS = [
    ("dynamic", {"depth": 4, "top_k": 3, "total_tokens": 16}),
    ("opt", {"nodes": 12, "threshold": 0.0, "max_depth": 5}),
    ("static", {"acceptance": "0.5,0.3,0.15", "budget": 14, "depth": 5}),
]


@pytest.mark.parametrize("name,params", TREE_ROWS, ids=[r[0] for r in TREE_ROWS])
def test_scripted_trees_accept_later_siblings(name: str, params: dict, family: str,
                                              every_tiny_adapters, references):
    """Real branching trees whose right token sits at sibling 2, 3, ... at mixed depths: the
    output equals the target's, and the test counts what it exercised."""
    target = every_tiny_adapters[family]["target"]
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=target.eos_token_ids)
    builder = make_builder(name, **params)
    steps = branching = later_sibling = deep = 0

    def watch(tree, logits, verdict) -> None:
        nonlocal steps, branching, later_sibling, deep
        steps += 1
        branching += not tree.is_chain
        par = tree.parents.tolist()
        later_sibling += sum(tree.children[par[a] + 1].index(a) > 0 for a in verdict.accepted)
        deep += verdict.num_accepted >= 2

    gapped = 0
    for prompt, reference in references[family]:
        logged = KeepLog(target)
        drafter = ScriptedTreeDrafter(reference, target.vocab_size)
        result = generate(logged, prompt, cfg, drafter, builder, observer=watch)
        assert result.tokens == reference, f"{name} diverged from target.generate"
        assert_stats_describe_emitted(result.stats)
        gapped += sum(c != list(range(len(c))) for c in logged.calls)
    # no tree collapsed into a chain, except a request's last step when the budget leaves no
    # room to draft (the core cuts trees to the tokens left)
    assert steps > 0 and steps - branching <= len(references[family]), (branching, steps)
    assert later_sibling >= steps // 2, (later_sibling, steps)
    assert gapped >= steps // 2, (gapped, steps)        # keep() through a non-first sibling
    assert deep >= steps // 4, (deep, steps)            # mixed depths: 2+ tokens accepted

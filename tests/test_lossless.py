"""End-to-end greedy losslessness: for every (drafter, tree) row, on both target families and
every prompt, speculative output is token-identical to the target's own ``generate``.

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
from lmms_sd.core.generate import GenerationConfig, generate
from lmms_sd.core.interfaces import PromptInputs
from lmms_sd.drafters.cascade import CascadeConfig, CascadeDrafter
from lmms_sd.drafters.eagle3 import Eagle3Config, Eagle3Drafter, bind_target_states
from lmms_sd.drafters.eagle3_format import new_eagle3_head
from lmms_sd.drafters.msd import qwen2_vl_rope_index
from lmms_sd.drafters.model import ModelDrafter
from lmms_sd.drafters.ngram import MaGDrafter
from lmms_sd.testing.scripted import ScriptedDrafter
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


@pytest.fixture(scope="module")
def references(tiny_adapters) -> dict[str, list[tuple[PromptInputs, list[int]]]]:
    from conftest import greedy_references

    return greedy_references(tiny_adapters, MAX_NEW)


_FITTED: dict[int, object] = {}


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
    rope = qwen2_vl_rope_index(view.model) if head.kind == "qwen2_vl" else None
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
def test_greedy_speculative_equals_target_generate(row: Row, family: str, tiny_adapters, references):
    adapters = tiny_adapters[family]
    target = adapters["target"]
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=target.eos_token_ids)
    builder = make_builder(row.tree, **dict(row.params))
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
        assert stats.origin.count("draft") <= sum(s.accepted for s in stats.steps)


def test_eagle3_rows_exercise_partial_acceptance(family: str, tiny_adapters, references):
    """The fitted EAGLE-3 head gets drafts both accepted and rejected (so the rows above test
    the KV and feature bookkeeping of both outcomes)."""
    target, drafter = fitted_eagle3(tiny_adapters[family]["target"], references[family], False)
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=target.eos_token_ids)
    steps = [s for prompt, _ in references[family]
             for s in generate(target, prompt, cfg, drafter, make_builder("chain", k=4)).stats.steps]
    assert any(0 < s.accepted < 4 for s in steps) and any(s.accepted == 0 for s in steps)


def test_scripted_drafter_exercises_partial_acceptance(family: str, tiny_adapters, references):
    adapters = tiny_adapters[family]
    target = adapters["target"]
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=target.eos_token_ids)
    prompt, reference = references[family][0]
    good = 2
    res = generate(target, prompt, cfg, ScriptedDrafter(reference, good, target.vocab_size),
                   make_builder("chain", k=4), decode=target.decode)
    assert res.tokens == reference
    # every full step accepted exactly `good` drafts, then the target corrected the wrong one
    assert all(s.accepted == good for s in res.stats.steps[:-1])


def test_stop_string_inside_an_accepted_block(family: str, tiny_adapters, references):
    """A stop string that completes in the middle of an accepted block stops decoding exactly
    where plain decoding would: on the token that completes it."""
    adapters = tiny_adapters[family]
    target = adapters["target"]
    prompt, reference = references[family][0]
    # choose a stop string that completes at token 10 of the reference
    text_at = [target.decode(reference[: j + 1]) for j in range(len(reference))]
    j = next((j for j in range(6, len(reference)) if text_at[j] != text_at[j - 1]
              and text_at[j][len(text_at[j - 1]):].strip()), None)
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


def test_eos_inside_an_accepted_block(family: str, tiny_adapters, references):
    """Declaring a token of the reference to be EOS stops both decoders on it."""
    adapters = tiny_adapters[family]
    target = adapters["target"]
    prompt, reference = references[family][1]
    eos = reference[5]
    first = reference.index(eos)
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=(eos,))
    ar = generate(target, prompt, cfg)
    sd = generate(target, prompt, cfg, ScriptedDrafter(reference, 8, target.vocab_size),
                  make_builder("chain", k=8))
    assert ar.tokens == sd.tokens == reference[: first + 1]

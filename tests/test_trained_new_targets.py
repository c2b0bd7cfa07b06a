"""Trained tiny Qwen2.5-VL and Qwen3-VL targets (``lmms_sd/assets/shapes/<family>/target``,
shapes recipe, 4 layers width 128): random weights hide position bugs, trained ones do not.
On held-out items speculative output equals ``generate``, and a target adapter that drops the
M-RoPE delta after the prompt (a broken adapter) does not."""
from __future__ import annotations

from pathlib import Path

import pytest

from lmms_sd.adapters import HFAdapter, load_adapter
from lmms_sd.core.generate import GenerationConfig, generate
from lmms_sd.testing.scripted import ScriptedDrafter
from lmms_sd.train.evaluate import eval_items
from lmms_sd.trees import make_builder

ASSETS = Path(__file__).resolve().parents[1] / "lmms_sd" / "assets" / "shapes"
FAMILIES = ("qwen2_5_vl", "qwen3_vl")
MAX_NEW = 24


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request: pytest.FixtureRequest) -> tuple[HFAdapter, list]:
    target = load_adapter(ASSETS / request.param / "target")
    items = eval_items(n_describe=4, n_qa=6, seed=1)
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=target.eos_token_ids)
    cases = []
    for it in items:
        prompt = target.prepare(it.question, [it.image])
        cases.append((prompt, target.hf_generate(prompt, MAX_NEW)))
    return target, cases, cfg


def test_trained_target_is_lossless_on_held_out_items(trained) -> None:
    target, cases, cfg = trained
    for prompt, reference in cases:
        for good, tree, settings in ((2, "chain", {"k": 4}),
                                     (1, "dynamic", {"depth": 4, "top_k": 2, "total_tokens": 8})):
            drafter = ScriptedDrafter(reference, good, target.vocab_size)
            out = generate(target, prompt, cfg, drafter, make_builder(tree, **settings))
            assert out.tokens == reference


def test_dropping_the_rope_delta_changes_trained_outputs(trained, monkeypatch) -> None:
    # the trained target reads its positions: text ids without the delta change some answers
    target, cases, cfg = trained
    target.prefill(cases[0][0])
    assert target.rope_delta != 0  # an image shifts the text positions after it
    monkeypatch.setattr(type(target), "_position_ids",
                        lambda self, positions: positions.view(1, 1, -1).expand(3, 1, -1))
    changed = sum(generate(target, prompt, cfg).tokens != reference
                  for prompt, reference in cases)
    assert changed >= 1

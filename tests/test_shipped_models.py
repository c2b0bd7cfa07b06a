"""The shipped shapes models (lmms_sd/assets/shapes): they load through ``load_adapter``, answer
held-out items about as well as their metrics say, and each shipped draft is lossless, with the
draft VLM (sees the image) accepted more often than the text-only draft (does not)."""
from __future__ import annotations

from pathlib import Path

import pytest

from lmms_sd.adapters import HFAdapter, load_adapter
from lmms_sd.assets import shipped_metrics, shipped_model, shipped_models
from lmms_sd.core.generate import GenerationConfig, generate
from lmms_sd.data.shapes import ShapesItem
from lmms_sd.drafters.model import ModelDrafter
from lmms_sd.train.evaluate import MAX_NEW_TOKENS, content_accuracy, eval_items
from lmms_sd.trees.chain import ChainBuilder, ChainConfig

FAMILIES = ("llava", "qwen2_vl")
ROLES = ("target", "draft_vlm", "text_only")
MARGIN = 0.1  # 12 items against the 96 of the metrics: allow for the smaller sample
CARDS = Path(__file__).resolve().parents[1] / "model_cards"


@pytest.fixture(scope="module")
def items() -> list[ShapesItem]:
    """12 held-out test-split items: 6 descriptions, then 2 each of count, colours, where."""
    return eval_items(n_describe=6, n_qa=6)


@pytest.fixture(scope="module", params=FAMILIES)
def suite(request: pytest.FixtureRequest, items: list[ShapesItem]) -> dict:
    family = request.param
    adapters = {role: load_adapter(shipped_model(family, role),
                                   role="target" if role == "target" else "draft")
                for role in ROLES}
    target = adapters["target"]
    cfg = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, eos_token_ids=target.eos_token_ids)
    reference = [generate(target, target.prepare(it.question, [it.image]), cfg).tokens
                 for it in items]
    return {"family": family, "adapters": adapters, "cfg": cfg, "reference": reference,
            "metrics": shipped_metrics(family)}


def _speculative(suite: dict, items: list[ShapesItem], role: str, k: int) -> tuple[list, float]:
    """Outputs and pooled tau of greedy speculative decoding with the shipped ``role`` draft."""
    target: HFAdapter = suite["adapters"]["target"]
    drafter = ModelDrafter(suite["adapters"][role], text_only=role == "text_only",
                           vocab_size=target.vocab_size)
    outputs, emitted, steps = [], 0, 0
    for it in items:
        res = generate(target, target.prepare(it.question, [it.image]), suite["cfg"], drafter,
                       ChainBuilder(ChainConfig(k)))
        outputs.append(res.tokens)
        emitted += sum(s.accepted + 1 for s in res.stats.steps)
        steps += res.stats.decode_steps
    return outputs, emitted / steps


def test_every_family_and_role_is_shipped() -> None:
    shipped = shipped_models()
    for family in FAMILIES:
        assert set(ROLES) <= set(shipped.get(family, ())), shipped


def test_unknown_model_error_lists_what_is_shipped() -> None:
    with pytest.raises(FileNotFoundError, match="shipped: .*'llava'"):
        shipped_model("llava", "no_such_role")


def test_target_accuracy_matches_its_metrics(suite: dict, items: list[ShapesItem]) -> None:
    target = suite["adapters"]["target"]
    measured = content_accuracy([target.decode(r) for r in suite["reference"]], items).accuracy
    claimed = suite["metrics"]["models"]["target"]["eval"]["content_accuracy"]
    assert measured >= claimed - MARGIN, (suite["family"], measured, claimed)


def test_drafts_are_lossless_and_the_vlm_draft_wins(suite: dict, items: list[ShapesItem]) -> None:
    k = suite["metrics"]["k"]
    taus = {}
    for role in ("draft_vlm", "text_only"):
        outputs, taus[role] = _speculative(suite, items, role, k)
        for it, out, ref in zip(items, outputs, suite["reference"]):
            assert out == ref, (suite["family"], role, it.uid)
    assert taus["draft_vlm"] > taus["text_only"] > 1.0, taus


@pytest.mark.parametrize("family", FAMILIES)
def test_model_cards_quote_the_measured_figures(family: str) -> None:
    metrics = shipped_metrics(family)
    for role in ROLES:
        ev = metrics["models"][role]["eval"]
        card = (CARDS / f"shapes_{family}_{role}.md").read_text()
        assert f"**{ev['content_accuracy']:.3f}**" in card, (family, role)
        assert metrics["models"][role]["command"] in card
        assert ("stage 1 on the" in card) == ("stage1" in metrics["models"][role]), role
        if role != "target":
            assert f"**tau {ev['speculative']['tau']:.2f}**" in card, (family, role)

"""The shipped MSD heads: each loads against its shipped target in the published layout, drafts
losslessly with MSD's dynamic tree on held-out items, and keeps the acceptance its card reports.
"""
from __future__ import annotations

import json

import pytest

from lmms_sd.adapters import load_adapter
from lmms_sd.assets import SHAPES_DIR, shipped_model, shipped_models
from lmms_sd.drafters.msd import load_msd_drafter
from lmms_sd.drafters.msd_format import WEIGHT_FILES, read_checkpoint
from lmms_sd.train.evaluate import MAX_NEW_TOKENS, greedy_outputs
from lmms_sd.train.msd_compare import (
    HEAD_ROLE,
    METRICS_FILE,
    TREES,
    describe_items,
    measure,
)

N_ITEMS = 6          # the first 6 of the card's held-out items
TAU_MARGIN = 0.5     # a 6-item subset may sit below the 16-item figure by this much
HEAD_FAMILIES = [f for f, roles in shipped_models().items() if HEAD_ROLE in roles]


def card_tau(family: str, tree: str) -> float:
    metrics = json.loads((SHAPES_DIR / family / METRICS_FILE).read_text())
    (row,) = [r for r in metrics["rows"] if r["drafter"] == HEAD_ROLE and r["tree"] == tree]
    return row["tau"]


def test_the_demo_default_head_is_shipped() -> None:
    assert "llava" in HEAD_FAMILIES  # python -m lmms_sd.demo runs llava_msd on it


@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_shipped_head_is_in_the_published_layout(family: str) -> None:
    folder = shipped_model(family, HEAD_ROLE)
    ckpt = read_checkpoint(folder)
    assert any((folder / name).is_file() for name in WEIGHT_FILES)
    assert ckpt.config["num_hidden_layers"] == 1
    assert "embed_tokens.weight" in ckpt.state_dict and "fc.weight" in ckpt.state_dict


@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_shipped_head_is_lossless_and_keeps_its_tau(family: str) -> None:
    target = load_adapter(shipped_model(family, "target"))
    # load_msd_head inside: the shipped embed_tokens must match the shipped target's
    drafter = load_msd_drafter(str(shipped_model(family, HEAD_ROLE)), target.model)
    items = describe_items(N_ITEMS)
    tree, settings = TREES["dynamic_59"]
    stats = measure(target, drafter, tree, settings, items,
                    greedy_outputs(target, items))  # raises unless token-identical
    assert stats["tau"] > card_tau(family, "dynamic_59") - TAU_MARGIN
    assert stats["tau"] > 2.0  # far above what an untrained head reaches (about 1)


@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_shipped_calibrator_steers_the_shipped_head_losslessly(family: str) -> None:
    """Offline mode of *_msd_calibrated: the shipped calibrator loads against the shipped
    target's vocabulary (else it raises) and every request is decoded with it, token-identical
    to the target's greedy output."""
    from lmms_sd.assets import shipped_calibrator
    from lmms_sd.calibration.online import CalibratedSettings, make_calibrated
    from lmms_sd.core.generate import GenerationConfig, generate

    target = load_adapter(shipped_model(family, "target"))
    head = load_msd_drafter(str(shipped_model(family, HEAD_ROLE)), target.model)
    settings = CalibratedSettings(calibrator=str(shipped_calibrator(family)), attention=False)
    drafter, builder, session = make_calibrated(head, settings, target.tokenizer,
                                                target.vocab_size)
    items = describe_items(3)
    references = greedy_outputs(target, items)
    cfg = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, eos_token_ids=target.eos_token_ids)
    session.plan({"shapes": len(items)})
    accepted = 0
    for item, reference in zip(items, references):
        phase = session.start_request("shapes", cfg.sampling)
        assert phase.calibrated and phase.measured  # offline: no calibration requests
        result = generate(target, target.prepare(item.question, [item.image]), cfg, drafter,
                          builder, target.decode, session.observe)
        assert result.tokens == reference, (family, item.uid)
        accepted += sum(s.accepted for s in result.stats.steps)
    assert accepted > 0

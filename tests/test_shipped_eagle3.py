"""The shipped shapes EAGLE-3 head: loads in the published layout onto the shipped LLaVA
target, decodes losslessly under a chain and EAGLE-3's tree, and gets drafts accepted."""
from __future__ import annotations

import pytest

from lmms_sd.adapters.loading import load_adapter
from lmms_sd.assets import SHAPES_DIR, shipped_model
from lmms_sd.core.generate import GenerationConfig, generate
from lmms_sd.drafters.eagle3 import bind_target_states, load_eagle3_drafter
from lmms_sd.train.msd_compare import describe_items
from lmms_sd.trees import make_builder

HEAD = SHAPES_DIR / "llava" / "eagle3_head"
pytestmark = pytest.mark.skipif(not (HEAD / "config.json").is_file(),
                                reason="no shipped EAGLE-3 head")


def test_the_shipped_head_is_lossless_and_accepted() -> None:
    target = load_adapter(shipped_model("llava", "target"))
    drafter = load_eagle3_drafter(str(HEAD), target.model)
    bind_target_states(target, drafter.head)
    cfg = GenerationConfig(max_new_tokens=40, eos_token_ids=target.eos_token_ids)
    for item in describe_items(2):
        prompt = target.prepare(item.question, [item.image])
        reference = generate(target, prompt, cfg).tokens
        for tree, settings in (("chain", {"k": 4}),
                               ("dynamic", {"depth": 7, "top_k": 10, "total_tokens": 60})):
            res = generate(target, prompt, cfg, drafter, make_builder(tree, **settings))
            assert res.tokens == reference, (item.uid, tree)
            assert res.stats.tau > 1.0, (item.uid, tree)  # some drafts accepted

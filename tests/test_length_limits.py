"""Length limits: a prompt the target cannot hold fails before decoding; a max_new_tokens past
the target's positions (lmms-eval asks for up to 49152) is clipped to the room left, the same for
speculative and autoregressive decoding, and no draft tree reaches past the last position."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from loguru import logger

from lmms_sd.adapters import HFAdapter
from lmms_sd.core.generate import GenerationConfig, generate
from lmms_sd.core.interfaces import PromptInputs
from lmms_sd.drafters.model import ModelDrafter
from lmms_sd.trees import make_builder
from test_lmms_eval_plugin import DOCS, make_model, requests

ROOM = 7


def record_positions(target: HFAdapter, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch ``target.forward`` to log the largest position of each call."""
    seen: list[int] = []
    forward = target.forward

    def spy(tokens: torch.Tensor, positions: torch.Tensor | None = None, *args: Any, **kw: Any):
        last = target.seq_len + len(tokens) - 1 if positions is None else int(positions.max())
        seen.append(last)
        return forward(tokens, positions, *args, **kw)

    monkeypatch.setattr(target, "forward", spy)
    return seen


@pytest.mark.parametrize("tree", [{"name": "chain", "k": 4}, {"name": "dynamic", "depth": 4,
                                                              "top_k": 2, "total_tokens": 8}])
def test_budget_is_clipped_to_max_length_and_trees_stay_inside(
        target: HFAdapter, draft_vlm: HFAdapter, prompts: list[PromptInputs], tree: dict,
        monkeypatch: pytest.MonkeyPatch):
    prompt = prompts[0]
    limit = len(prompt.input_ids) + ROOM
    cfg = GenerationConfig(max_new_tokens=49152, max_length=limit)  # no EOS: run to the limit
    seen = record_positions(target, monkeypatch)
    params = {k: v for k, v in tree.items() if k != "name"}
    sd = generate(target, prompt, cfg, ModelDrafter(draft_vlm), make_builder(tree["name"], **params))
    assert seen and max(seen) <= limit - 1, f"a verify forward reached position {max(seen)}"
    assert any(s.tree_size for s in sd.stats.steps), "the draft must have proposed something"
    ar = generate(target, prompt, cfg)
    assert sd.tokens == ar.tokens and len(ar.tokens) == ROOM
    reference = target.hf_generate(prompt, ROOM)  # transformers, stopping at the target's EOS
    assert ar.tokens[:len(reference)] == reference


def test_a_prompt_the_target_cannot_hold_fails_before_decoding(
        target: HFAdapter, prompts: list[PromptInputs], monkeypatch: pytest.MonkeyPatch):
    prompt = prompts[0]
    monkeypatch.setattr(target, "prefill", lambda *a, **k: pytest.fail("decoding started"))
    cfg = GenerationConfig(max_new_tokens=4, max_length=len(prompt.input_ids))
    with pytest.raises(ValueError, match=f"holds at most {len(prompt.input_ids)} positions"):
        generate(target, prompt, cfg)


def prompt_lengths(model: Any, n: int) -> list[int]:
    from lmms_sd.testing.tiny import tiny_image

    return [len(model.target.prepare(DOCS[i]["question"], [tiny_image(DOCS[i]["seed"])]).input_ids)
            for i in range(n)]


@pytest.fixture(scope="module")
def llava_sd(tiny_paths: dict) -> Any:
    paths = tiny_paths["llava"]
    return make_model("llava", pretrained=paths["target"], draft=paths["draft_vlm"],
                      baseline=True, tree="chain", **{"tree.k": 4})


def test_lmms_eval_requests_stop_at_the_limit_with_one_warning(
        llava_sd: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import json
    import dataclasses

    lengths = prompt_lengths(llava_sd, 2)
    limit = max(lengths) + 3
    monkeypatch.setattr(type(llava_sd.target), "max_positions", property(lambda self: limit))
    monkeypatch.setattr(llava_sd, "_clipped_tasks", set())
    monkeypatch.setattr(llava_sd, "settings", dataclasses.replace(
        llava_sd.settings, stats_path=str(tmp_path / "s.jsonl")))
    import lmms_eval.models  # noqa: F401  (importing it resets loguru's handlers: do it first)

    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(str(m)), level="WARNING")
    try:
        out = llava_sd.generate_until(requests(False, {"max_new_tokens": 49152, "until": []}, n=2))
    finally:
        logger.remove(sink)
    assert [o.token_counts.output_tokens for o in out] == [limit - n for n in lengths]
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert all(r["text_match"] for r in records)
    clipped = [w for w in warnings if "max_new_tokens=49152" in w]
    assert len(clipped) == 1 and f"target's {limit} positions" in clipped[0], warnings


def test_lmms_eval_overlong_prompt_names_task_doc_and_limit(llava_sd: Any,
                                                            monkeypatch: pytest.MonkeyPatch):
    limit = prompt_lengths(llava_sd, 1)[0] - 1
    monkeypatch.setattr(type(llava_sd.target), "max_positions", property(lambda self: limit))
    with pytest.raises(ValueError, match=f"t doc 0: the prompt has .* at most {limit} positions"):
        llava_sd.generate_until(requests(False, {"max_new_tokens": 8}, n=1))

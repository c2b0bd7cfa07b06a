"""The draft studies on tiny models: engine efficiency, draft potential, trajectory pictures.

Timings on a shared CPU are noise, so no assertion bounds a time; the checks are the identities
between the numbers (ideal = tokens/fwd x t1 / t_verify, efficiency = achieved / ideal), counts
taken two ways (forwards at the adapter against steps in the loop's stats, accepted tokens in
the plots against the records' origins) and exact cases (KL of a model against itself is 0).
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from PIL import Image

from lmms_sd.adapters import load_adapter
from lmms_sd.bench import efficiency, plots, potential, studies
from lmms_sd.calibration.features import CATEGORIES
from lmms_sd.core import generate as generate_module
from lmms_sd.core.interfaces import PromptInputs
from lmms_sd.core.tree import DraftTree
from lmms_sd.core.verify import verify_greedy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def llava(tiny_adapters):
    return tiny_adapters["llava"]


@pytest.fixture(scope="module")
def llava_prompts(llava):
    return potential.study_prompts(llava["target"], 2)


# ---------------------------------------------------------------------------- efficiency

def test_efficiency_rows_are_consistent(llava, llava_prompts):
    cfg = efficiency.EfficiencyConfig(alphas=(1.0, 0.5), ks=(2, 3), max_new_tokens=12,
                                      repeats=1, step_repeats=10, warmup=1)
    mask_method, depths_method = DraftTree.attention_mask, DraftTree.slot_depths
    result = efficiency.measure(llava["target"], llava_prompts[:1], cfg)
    rows = result["rows"]
    assert [r["setting"] for r in rows] == ["ar", "oracle a=1 k=2", "oracle a=1 k=3",
                                            "oracle a=0.5 k=2", "oracle a=0.5 k=3"]
    costs = {int(q): t for q, t in result["step_costs_ms"].items()}
    assert sorted(costs) == [1, 3, 4] and all(t > 0 for t in costs.values())
    ar = rows[0]
    assert ar["tau"] == ar["tokens_per_forward"] == ar["ideal"] == ar["achieved"] == 1
    for r in rows:
        assert r["mismatches"] == 0, f"{r['setting']} changed the greedy output"
        assert r["target_forwards"] == r["decode_steps"], "adapter count disagrees with the loop"
        assert r["decode_tokens"] == 11  # fixed length: 12 new tokens, the first from the prefill
        # tokens/fwd is tau but for the last step's tokens cut at the budget (at most k)
        cut = (r["tau"] - r["tokens_per_forward"]) * r["decode_steps"]
        assert -1e-9 <= cut <= r["k"] + 1e-9
        assert r["achieved"] == pytest.approx(ar["decode_wall_s"] / r["decode_wall_s"])
        assert r["efficiency"] == pytest.approx(r["achieved"] / r["ideal"])
        # loose on purpose: a timing bound must not flake on a shared machine; a unit slip
        # (ms against s) would be off by 1000
        assert 0 < r["efficiency"] < 5 and math.isfinite(r["efficiency"])
        _check_profile(r)
    for r in rows[1:]:
        k = r["k"]
        assert r["ideal"] == pytest.approx(r["tokens_per_forward"] * costs[1] / costs[k + 1])
        if r["alpha"] == 1.0:
            # every draft inside the budget is right: k+1 tokens a step but where the chain runs
            # past the reference in the last step
            assert r["expected_tau"] == k + 1 and r["tau"] >= k + 1 - k / r["decode_steps"]
            assert r["ideal"] >= 1
        else:
            assert r["tau"] < k + 1
    md = efficiency.to_markdown(result)
    assert all(f"| {r['setting']} |" in md for r in rows)
    # the profiler's swapped-in timers are gone
    assert generate_module.verify_greedy is verify_greedy
    assert DraftTree.attention_mask is mask_method and DraftTree.slot_depths is depths_method


def _check_profile(row: dict) -> None:
    prof = row["profile_ms_per_step"]
    assert tuple(prof) == efficiency.PARTS
    assert all(v >= -1e-3 for v in prof.values()), prof
    assert prof["target forward"] > 0
    assert prof["mask building"] == 0, "a chain must verify on the causal fast path, no mask"
    total = sum(prof.values()) * row["decode_steps"] / 1e3
    assert total == pytest.approx(row["profiled_decode_s"])
    if row["alpha"] is None:
        assert prof["drafter"] == prof["tree building"] == prof["cache edits"] == 0
    elif row["alpha"] < 1:
        assert prof["cache edits"] > 0 and prof["drafter"] > 0


def test_expected_tau():
    assert efficiency.expected_tau(1.0, 4) == 5
    assert efficiency.expected_tau(0.0, 4) == 1
    assert efficiency.expected_tau(0.5, 2) == pytest.approx(1.75)


def test_efficiency_cli_on_the_tiny_shape(tmp_path):
    result = efficiency.main(["--shape", "tiny", "--items", "1", "--prompt-len", "8",
                              "--max-new-tokens", "8", "--alphas", "1", "--k", "2",
                              "--repeats", "1", "--step-repeats", "3", "--warmup", "1",
                              "--device", "cpu", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "efficiency.json").read_text())
    assert data["meta"]["target"] == "tiny random weights" and data["meta"]["device"] == "cpu"
    assert [r["setting"] for r in data["rows"]] == ["ar", "oracle a=1 k=2"]
    assert data["rows"] == json.loads(json.dumps(result["rows"]))
    assert (tmp_path / "efficiency.md").read_text().count("| oracle a=1 k=2 |") == 2


def test_llava_7b_shape_maps_to_the_decoder_config():
    shape = efficiency.SHAPES["llava-7b"]
    assert (shape.hidden, shape.layers, shape.heads, shape.intermediate, shape.vocab) == (
        4096, 32, 32, 11008, 32064)
    assert 6.7e9 < shape.parameters() < 6.8e9  # LLaVA-1.5-7B's language model: 6.74B
    small = dataclasses.replace(shape, hidden=64, intermediate=96, vocab=700)  # 32 heads of 2
    target = efficiency.build_shape_target(small, layers=1)
    cfg = target.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (64, 1, 32, 32, 700)
    assert target.family == "causal_lm" and target.dtype == torch.float32
    prompt = efficiency.random_prompts(target, 1, 5)[0]
    assert target.prefill(prompt).logits.shape == (5, 700)
    with pytest.raises(SystemExit, match="--layers"):
        efficiency.main(["--shape", "llava-7b", "--device", "cpu", "--out", "unused"])


# ---------------------------------------------------------------------------- potential

def test_kl_per_position_by_hand():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    kl = potential.kl_per_position(p.log()[None], q.log()[None])
    assert kl.item() == pytest.approx(want)
    same = torch.randn(3, 7)
    assert potential.kl_per_position(same, same).abs().max().item() < 1e-12
    # a smaller draft vocabulary: both renormalised over the shared ids
    target = torch.tensor([[0.0, 0.0, 5.0]])
    assert potential.kl_per_position(target, torch.tensor([[0.0, 0.0]])).item() == pytest.approx(0)
    with pytest.raises(ValueError, match="rows"):
        potential.kl_per_position(torch.zeros(2, 3), torch.zeros(3, 3))


def test_text_only_rows_align_from_the_end(llava, llava_prompts):
    prompt, cont = llava_prompts[0], [5, 17, 42]
    text_only = llava["text_only"]
    rows = potential.next_token_logits(text_only, prompt, cont)
    ids = prompt.text_only_ids()
    assert len(ids) < len(prompt.input_ids)  # the image tokens are gone
    full = text_only.prefill(PromptInputs(torch.cat([ids, torch.tensor(cont)]))).logits
    assert torch.equal(rows, full[len(ids) - 1: len(ids) - 1 + len(cont)])


def test_potential_ranks_drafts_and_the_target_is_its_own_perfect_draft(llava, llava_prompts,
                                                                       tiny_paths):
    target = llava["target"]
    itself = load_adapter(tiny_paths["llava"]["target"], role="draft")
    drafts = {"vlm": llava["draft_vlm"], "self": itself, "text": llava["text_only"]}
    cfg = potential.PotentialConfig(max_new_tokens=10, k=4)
    result = potential.potential(target, drafts, llava_prompts, cfg)
    rows = result["rows"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert [r["kl"] for r in rows] == sorted(r["kl"] for r in rows)
    by = {r["draft"]: r for r in rows}
    assert rows[0]["draft"] == "self" and by["self"]["kl"] == 0.0 and by["self"]["top1_match"] == 1
    assert by["self"]["acceptance_rate"] > 0.9 and by["self"]["tau"] > 3
    assert by["vlm"]["kl"] > 0 and by["text"]["kl"] > 0
    assert len({r["positions"] for r in rows}) == 1 and rows[0]["positions"] > 0
    assert all(r["mismatches"] == 0 for r in rows)
    assert -1 <= result["spearman_kl_tau"] <= 1
    with pytest.raises(ValueError, match="target adapter itself"):
        potential.potential(target, {"t": target}, llava_prompts, cfg)


# ---------------------------------------------------------------------------- plots

def test_offered_positions_by_hand():
    # chains of 3: a step accepting 2 ends in a correction (offered, rejected); a step accepting
    # all 3 ends in a bonus token (not offered)
    stats = {"tokens": list(range(8)), "origin": "tddtdddt", "accepted_per_step": [2, 3],
             "tree_size_per_step": [3, 3]}
    assert list(plots.offered_positions(stats)) == [(1, True), (2, True), (3, False), (4, True),
                                                    (5, True), (6, True)]
    with pytest.raises(ValueError, match="contradicts"):
        list(plots.offered_positions({**stats, "origin": "tdtddddt"}))
    # a last step cut after two accepted drafts counts one (tokens emitted less one)
    cut = {"tokens": list(range(6)), "origin": "tddtdd", "accepted_per_step": [2, 1],
           "tree_size_per_step": [3, 3]}
    assert list(plots.offered_positions(cut)) == [(1, True), (2, True), (3, False), (4, True),
                                                  (5, True)]


def _png_size(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000
    with Image.open(path) as im:
        return im.size


def test_plots_from_records(llava, llava_prompts, tiny_paths, tmp_path):
    methods = ["oracle:chain:k=3", "draft_vlm:chain:k=2"]
    records = studies.collect_records(llava, llava_prompts, methods, max_new_tokens=12, alpha=0.6)
    assert len(records) == 4 and all(r["match_ar"] for r in records)
    for name, method in (("oracle", methods[0]), ("vlm", methods[1])):
        mine = [r for r in records if r["method"] == method]
        studies.write_jsonl(tmp_path / f"{name}.jsonl", mine)
    summary = plots.main(["--records", str(tmp_path / "oracle.jsonl"),
                          f"vlm={tmp_path / 'vlm.jsonl'}",
                          "--tokenizer", str(tiny_paths["llava"]["target"]),
                          "--out", str(tmp_path / "out")])
    for name in ("trajectories.png", "acceptance_by_category.png", "accept_length_hist.png"):
        w, h = _png_size(tmp_path / "out" / name)
        assert w > 300 and h > 200
    assert set(summary["acceptance"]) == {methods[0], "vlm"}
    for label, method in ((methods[0], methods[0]), ("vlm", methods[1])):
        mine = [r["stats"] for r in records if r["method"] == method]
        acc = summary["acceptance"][label]
        assert acc["all"]["accepted"] == sum(s["origin"].count("d") for s in mine)
        assert acc["all"]["offered"] == sum(acc[c]["offered"] for c in CATEGORIES)
        lengths = {int(a): n for a, n in summary["accepted_lengths"][label].items()}
        drafting = sum(1 for s in mine for size in s["tree_size_per_step"] if size)
        assert 0 < drafting == sum(lengths.values())  # a last step with one token left drafts none
        assert sum(a * n for a, n in lengths.items()) == sum(s["accepted"] for s in mine)
    oracle = summary["acceptance"][methods[0]]["all"]
    assert 0 < oracle["accepted"] < oracle["offered"]  # alpha 0.6: some right, some wrong


def test_studies_cli(tiny_paths, tmp_path):
    paths = tiny_paths["llava"]
    studies.main(["--target", str(paths["target"]), "--text-only", str(paths["text_only"]),
                  "--self-draft", "--items", "1", "--max-new-tokens", "6",
                  "--methods", "oracle:chain:k=2", "--out", str(tmp_path)])
    pot = json.loads((tmp_path / "potential.json").read_text())
    assert [r["draft"] for r in pot["rows"]] == ["target (self)", "text_only"]
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 1
    assert _png_size(tmp_path / "plots" / "trajectories.png")[0] > 300

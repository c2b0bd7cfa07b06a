"""The benchmark command on tiny models: schema and internal consistency of its outputs."""
from __future__ import annotations

import json

import pytest

from lmms_sd.bench import run as bench


@pytest.fixture(scope="module")
def llava_models(tiny_adapters):
    return tiny_adapters["llava"]


def test_bench_rows_are_consistent(llava_models):
    prompts = bench.shapes_prompts(llava_models["target"], 2)
    methods = ["ar", "oracle:chain:k=3", "draft_vlm:chain:k=2", "text_only:dynamic:depth=2;top_k=2;total_tokens=4"]
    rows, records = bench.run(llava_models, prompts, methods, max_new_tokens=10, repeats=2, hf=True)
    assert [r["method"] for r in records] == [m for m in methods for _ in prompts]
    names = [r["method"] for r in rows]
    assert names == methods + ["hf_generate", "hf_assisted(draft_vlm)", "hf_prompt_lookup(10)"]
    by = {r["method"]: r for r in rows}
    for r in rows:
        assert r["mismatches"] == 0, f"{r['method']} is not lossless"
        assert len(r["walls_s"]) == 2 and min(r["walls_s"]) <= r["wall_s"] <= max(r["walls_s"])
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["wall_s"])
        assert r["speedup"] == pytest.approx(by["ar"]["wall_s"] / r["wall_s"])
    assert by["ar"]["tau"] == 1 and by["ar"]["target_fwd_per_token"] == 1
    assert by["ar"]["ceiling"] == pytest.approx(1.0)
    for name in methods[1:]:  # tau x t1 / t_verify(mean tree size + 1)
        r = by[name]
        assert r["verify_over_t1"] > 0 and r["ceiling"] == pytest.approx(r["tau"] / r["verify_over_t1"])
    assert by["hf_generate"].get("ceiling") is None
    oracle = by["oracle:chain:k=3"]
    # a perfect oracle emits k+1 tokens per step, except in the last step, whose tree is cut to
    # the tokens left (10 tokens: root, 4, 4, then 1 with no draft)
    assert 3 <= oracle["tau"] <= 4 and oracle["acceptance_rate"] >= 0.75
    assert oracle["target_fwd_per_token"] < 0.6
    md = bench.to_markdown(rows)
    assert all(f"| {n} |" in md for n in names)


def test_bench_cli_writes_json_and_markdown(tiny_paths, tmp_path):
    paths = tiny_paths["llava"]
    bench.main(["--target", str(paths["target"]), "--draft-vlm", str(paths["draft_vlm"]),
                "--text-only", str(paths["text_only"]), "--items", "1", "--repeats", "1",
                "--max-new-tokens", "6", "--methods", "ar", "draft_vlm:chain:k=2",
                "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["ar", "draft_vlm:chain:k=2"]
    assert data["meta"]["items"] == 1 and "torch" in data["meta"]["machine"]
    assert (tmp_path / "bench.md").read_text().count("\n|") >= 3
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["ar", "draft_vlm:chain:k=2"]
    assert records[1]["stats"]["new_tokens"] == len(records[1]["stats"]["tokens"])


def test_method_spec_errors():
    from lmms_sd.bench.methods import Method

    assert Method.parse("x:static:acceptance=0.5;0.2;budget=4").tree_params == (
        ("acceptance", "0.5,0.2"), ("budget", "4"))
    with pytest.raises(ValueError, match="expected"):
        Method.parse("chain")
    with pytest.raises(ValueError, match="unknown tree builder"):
        Method.parse("draft_vlm:bogus").builder()


def test_bench_runs_an_msd_head_losslessly(tiny_paths, tiny_adapters, tmp_path):
    from lmms_sd.drafters.msd_format import new_msd_head, save_msd_head

    import torch

    paths = tiny_paths["llava"]
    torch.manual_seed(0)
    save_msd_head(new_msd_head(tiny_adapters["llava"]["target"].model), tmp_path / "head")
    bench.main(["--target", str(paths["target"]), "--msd-head", str(tmp_path / "head"),
                "--items", "1", "--repeats", "1", "--max-new-tokens", "8",
                "--methods", "ar", "msd:dynamic:depth=2;top_k=2;total_tokens=4",
                "--out", str(tmp_path / "out")])
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["ar", "msd:dynamic:depth=2;top_k=2;total_tokens=4"]
    assert rows[1]["mismatches"] == 0 and rows[1]["tau"] >= 1


def test_cascade_study_is_lossless_and_prices_every_forward(llava_models):
    from lmms_sd.bench import cascade

    models = {k: v for k, v in llava_models.items() if k in ("target", "draft_vlm", "text_only")}
    prompts = bench.shapes_prompts(models["target"], 1)
    rows = cascade.run(models, prompts, cascade.DEFAULT_SPECS, max_new_tokens=8)
    assert [r["method"] for r in rows] == ["ar"] + [s.name for s in cascade.DEFAULT_SPECS]
    ar = rows[0]
    for r in rows:
        assert r["mismatches"] == 0
        assert r["speedup"] == pytest.approx(ar["wall_s"] / r["wall_s"])
        assert r["cost_speedup"] == pytest.approx(ar["cost_units"] / r["cost_units"])
    # drafts cost something on top of the target's forwards: a random draft cannot be free
    assert all(r["cost_units"] > 0 for r in rows)


def test_cascade_sweep_grid_is_valid():
    from lmms_sd.bench.cascade import sweep_specs
    from lmms_sd.drafters.cascade import CascadeConfig

    specs = sweep_specs(ks=(2, 3), lenience=(1.0, 2.0))
    assert len({s.name for s in specs}) == 4
    for s in specs:  # every grid point is a valid published k_matrix
        assert CascadeConfig.of(s.k_matrix, s.lenience).depth == 3


def test_bench_interleaves_methods_per_prompt(llava_models, monkeypatch):
    """Timed passes run every method on one prompt before the next prompt, order rotated."""
    prompts = bench.shapes_prompts(llava_models["target"], 2)
    seen: list[tuple[int, bool]] = []
    real = bench.generate

    def spy(target, prompt, cfg, drafter=None, builder=None, *a, **k):
        seen.append(([id(p) for p in prompts].index(id(prompt)), drafter is not None))
        return real(target, prompt, cfg, drafter, builder, *a, **k)

    monkeypatch.setattr(bench, "generate", spy)
    bench.run(llava_models, prompts, ["ar", "oracle:chain:k=2"], max_new_tokens=4, repeats=2)
    timed = seen[-8:]  # after the reference pass and one warm-up per method
    assert [p for p, _ in timed] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [sd for _, sd in timed] == [False, True, True, False, False, True, True, False]


def test_bench_plans_auto_trees_and_runs_mag(llava_models):
    prompts = bench.shapes_prompts(llava_models["target"], 1)
    rows, _ = bench.run(llava_models, prompts, ["ar", "draft_vlm:auto", "mag:chain:k=4"],
                        max_new_tokens=8, repeats=1)
    by = {r["method"]: r for r in rows}
    assert by["draft_vlm:auto"]["planned_tree"].split(":")[0] in ("chain", "static", "dynamic")
    assert all(r["mismatches"] == 0 for r in rows)

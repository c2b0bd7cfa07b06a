"""The lmms-eval layer: speed aggregation, registration, model construction, and real CLI runs."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lmms_sd.lmms_eval.speed import flat_metrics, gather, summarize, summarize_by_task


# ---------------------------------------------------------------------------- speed math

def stats(new_tokens: int, wall: float, accepted: list[int], depth: int, draft_forwards: int = 0):
    """A record's stats as ``sample_stats`` writes them: ``depth`` drafted per step."""
    return {"new_tokens": new_tokens, "wall_time": wall, "decode_steps": len(accepted),
            "accepted": sum(accepted), "drafted": depth * len(accepted),
            "target_forwards": 1 + len(accepted), "draft_forwards": draft_forwards}


def record(task: str, doc_id: int, st: dict, base: dict | None = None, match: bool | None = None,
           rank: int = 0) -> dict:
    return {"task": task, "doc_id": doc_id, "rank": rank, "greedy": True, "stats": st,
            "baseline": base, "text_match": match}


def test_summary_pools_counts_before_dividing():
    # request a: 2 steps accepting 3 and 1 of 4 drafted; b: 1 step accepting 0 of 4
    a = record("t", 0, stats(new_tokens=7, wall=1.0, accepted=[3, 1], depth=4, draft_forwards=8))
    b = record("t", 1, stats(new_tokens=2, wall=2.0, accepted=[0], depth=4, draft_forwards=4))
    s = summarize([a, b])
    assert s["requests"] == 2 and s["new_tokens"] == 9 and s["wall_time"] == 3.0
    assert s["tokens_per_second"] == pytest.approx(9 / 3.0)
    assert s["tau"] == pytest.approx((4 + 3) / 3)            # (accepted + steps) / steps
    assert s["acceptance_rate"] == pytest.approx(4 / 12)      # accepted / drafted
    assert s["target_forwards_per_token"] == pytest.approx(5 / 9)  # 2 prefills + 3 steps
    assert s["draft_forwards_per_token"] == pytest.approx(12 / 9)
    assert "speedup" not in s and "mismatches" not in s       # no baseline


def test_summary_speedup_and_mismatches_with_baseline():
    sd = stats(new_tokens=10, wall=1.0, accepted=[4, 4], depth=4)
    ar = stats(new_tokens=10, wall=3.0, accepted=[0] * 9, depth=0)
    recs = [record("t", 0, sd, ar, True), record("t", 1, sd, ar, False),
            {**record("t", 2, sd, ar, None), "greedy": False}]
    s = summarize(recs)
    assert s["baseline_tokens_per_second"] == pytest.approx(30 / 9.0)
    assert s["speedup"] == pytest.approx((30 / 3.0) / (30 / 9.0))
    assert (s["compared"], s["mismatches"]) == (2, 1)


def test_autoregressive_records_report_tau_one_and_no_acceptance_rate():
    ar = stats(new_tokens=5, wall=1.0, accepted=[0, 0, 0, 0], depth=0)
    s = summarize([record("t", 0, ar)])
    assert s["tau"] == 1.0 and "acceptance_rate" not in s
    assert s["target_forwards_per_token"] == 1.0


def test_per_task_split_and_flat_names():
    recs = [record("b", 0, stats(3, 1.0, [1], 2)), record("a", 0, stats(2, 1.0, [0], 2)),
            record("a", 1, stats(4, 1.0, [2], 2))]
    by = summarize_by_task(recs)
    assert list(by) == ["overall", "a", "b"]
    assert by["a"]["requests"] == 2 and by["b"]["requests"] == 1
    assert by["overall"]["new_tokens"] == by["a"]["new_tokens"] + by["b"]["new_tokens"]
    flat = flat_metrics(by)
    assert flat["tau"] == by["overall"]["tau"] and flat["a/tau"] == by["a"]["tau"]
    assert flat["b/requests"] == 1


def test_gather_single_process_sorts_by_task_and_doc():
    recs = [record("b", 1, stats(1, 1.0, [], 0)), record("a", 3, stats(1, 1.0, [], 0)),
            record("a", 0, stats(1, 1.0, [], 0))]
    assert [(r["task"], r["doc_id"]) for r in gather(recs)] == [("a", 0), ("a", 3), ("b", 1)]


# ---------------------------------------------------------------------------- registration

def test_entry_point_lists_our_manifests():
    from importlib.metadata import entry_points

    from lmms_sd.lmms_eval.registry import MANIFESTS

    values = [ep.value for ep in entry_points(group="lmms_eval.models")]
    assert "lmms_sd.lmms_eval.registry:MANIFESTS" in values, \
        "entry point missing: install the package (pip install --no-deps -e .)"
    from lmms_sd.lmms_eval.names import model_classes

    assert {m.model_id for m in MANIFESTS} == {name for name, *_ in model_classes()}
    assert {"llava_eagle3", "qwen2_vl_eagle3", "qwen3_vl_msd"} <= {m.model_id for m in MANIFESTS}


@pytest.mark.parametrize("force_simple", [False, True])
def test_every_name_resolves_to_a_valid_class(force_simple: bool):
    """lmms-eval's own resolution: chat class by default, simple with --force_simple, and its
    check that ``is_simple`` agrees with the resolved kind."""
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from lmms_sd.lmms_eval.registry import MANIFESTS

    registry = ModelRegistryV2()
    for manifest in MANIFESTS:
        registry.register_manifest(manifest)
    for manifest in MANIFESTS:
        cls = registry.get_model_class(manifest.model_id, force_simple=force_simple)
        assert cls.is_simple is force_simple
        assert cls.family in manifest.model_id


# ---------------------------------------------------------------------------- models in process

@pytest.fixture(scope="session")
def noisy_drafts(tiny_paths: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per family, the target with noise on its lm_head: a draft that agrees often but not
    always, so every run mixes accepted and rejected draft tokens."""
    from lmms_sd.adapters.loading import VLM_FAMILIES, load_processor

    root = tmp_path_factory.mktemp("noisy_drafts")
    out = {}
    for family, paths in tiny_paths.items():
        model = VLM_FAMILIES[family][0].from_pretrained(paths["target"])
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            w = model.get_output_embeddings().weight
            w.add_(0.3 * w.std() * torch.randn(w.shape, generator=gen))
        out[family] = root / family
        model.save_pretrained(out[family])
        load_processor(paths["target"]).save_pretrained(out[family])
    return out


def model_class(family: str, chat: bool = False, method: str = "SD") -> type:
    from lmms_sd.lmms_eval import models
    from lmms_sd.lmms_eval.names import FAMILY_PREFIX

    name = FAMILY_PREFIX[family] + method + ("Chat" if chat else "")
    return getattr(models, name)


DOCS = [{"question": q, "seed": i} for i, q in enumerate(
    ["Describe the image.", "What is in the picture?", "Tell me about the shapes."])]


def requests(chat: bool, gen_kwargs: dict, n: int = len(DOCS), pad: int = 0) -> list:
    """lmms-eval ``generate_until`` Instances over ``DOCS`` (task "t", split "test"), plus
    ``pad`` padding duplicates of the last one, as the evaluator adds them."""
    from lmms_eval.api.instance import Instance

    from lmms_sd.testing.tiny import tiny_image

    def visual(doc: dict) -> list:
        return [tiny_image(doc["seed"])]

    def messages(doc: dict) -> list:
        return [{"role": "user", "content": [{"type": "image", "url": visual(doc)[0]},
                                             {"type": "text", "text": doc["question"]}]}]

    out = []
    for i in list(range(n)) + [n - 1] * pad:
        args = ((DOCS[i]["question"], messages, dict(gen_kwargs), i, "t", "test") if chat else
                (DOCS[i]["question"], dict(gen_kwargs), visual, i, "t", "test"))
        meta = {"task": "t", "doc_id": i, "repeats": 1}
        if len(out) >= n:
            meta["__padding_only__"] = True
        out.append(Instance("generate_until", args, 0, metadata=meta))
    return out


def make_model(family: str, chat: bool = False, method: str = "SD", **model_args: Any):
    model = model_class(family, chat, method)(**{k: str(v) for k, v in model_args.items()})
    model.task_dict = {"t": {"test": DOCS}}
    return model


@pytest.fixture(scope="module")
def sd_models(tiny_paths: dict, noisy_drafts: dict) -> dict[str, Any]:
    """Per family: the simple class with the noisy draft, a chain of 3 and a baseline."""
    return {f: make_model(f, pretrained=tiny_paths[f]["target"], draft=noisy_drafts[f],
                          baseline=True, tree="chain", **{"tree.k": 3}) for f in tiny_paths}


GREEDY = {"until": ["\n\n"], "max_new_tokens": 24, "do_sample": False}


def shared(model: Any, monkeypatch: pytest.MonkeyPatch, chat: bool = False,
           stats: Path | None = None) -> Any:
    """A shared model set, for one test only, to take chat or simple requests (the chat class
    differs from the simple one in this flag alone) and to write its records to ``stats``."""
    monkeypatch.setattr(model, "is_simple", not chat)
    monkeypatch.setattr(model, "settings", dataclasses.replace(
        model.settings, stats_path=None if stats is None else str(stats)))
    return model


@pytest.mark.parametrize("chat", [False, True])
def test_speculative_text_equals_autoregressive(sd_models: dict, tiny_paths: dict, family: str,
                                                chat: bool, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch):
    model = shared(sd_models[family], monkeypatch, chat, tmp_path / "s.jsonl")
    out = model.generate_until(requests(chat, GREEDY))
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in records] == [0, 1, 2]
    assert all(r["text_match"] for r in records)
    accepted = sum(r["stats"]["accepted"] for r in records)
    assert 0 < accepted < sum(r["stats"]["drafted"] for r in records), "want partial acceptance"
    for o, r in zip(out, records):
        assert o.token_counts.output_tokens == r["stats"]["new_tokens"] > 0
        assert len(r["stats"]["origin"]) == len(r["stats"]["tokens"]) == r["stats"]["new_tokens"]
    off = make_model(family, chat, pretrained=tiny_paths[family]["target"], sd="off")
    assert [o.text for o in off.generate_until(requests(chat, GREEDY))] == [o.text for o in out]
    assert off.drafter is None


def test_chat_and_simple_requests_build_the_same_prompt(sd_models: dict, family: str,
                                                        monkeypatch: pytest.MonkeyPatch):
    texts = []
    for chat in (False, True):
        model = shared(sd_models[family], monkeypatch, chat)
        texts.append([o.text for o in model.generate_until(requests(chat, GREEDY, n=1))])
    assert texts[0] == texts[1]


def test_padding_duplicates_are_not_decoded_or_counted(sd_models: dict, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    model = shared(sd_models["llava"], monkeypatch, stats=tmp_path / "s.jsonl")
    out = model.generate_until(requests(False, GREEDY, n=2, pad=2))
    assert len(out) == 4 and out[2].text == out[3].text == "" and out[0].text
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 2


def test_until_and_max_new_tokens_are_honoured(sd_models: dict, monkeypatch: pytest.MonkeyPatch):
    model = shared(sd_models["llava"], monkeypatch)
    full = model.generate_until(requests(False, {**GREEDY, "until": []}, n=1))[0]
    letters = re.search(r"[A-Za-z]{2}", full.text[3:])  # ASCII: decodes the same in any prefix
    assert letters, f"need an output with two ASCII letters after the start: {full.text!r}"
    stop = letters.group()
    cut = model.generate_until(requests(False, {**GREEDY, "until": [stop]}, n=1))[0]
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.token_counts.output_tokens < full.token_counts.output_tokens
    short = model.generate_until(requests(False, {**GREEDY, "max_new_tokens": 5}, n=1))[0]
    assert short.token_counts.output_tokens == 5 and full.text.startswith(short.text)


def test_sampling_requests_decode_and_skip_the_text_comparison(sd_models: dict, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    model = shared(sd_models["qwen2_vl"], monkeypatch, stats=tmp_path / "s.jsonl")
    kwargs = {**GREEDY, "do_sample": True, "temperature": 0.8, "top_p": 0.9}
    first = [o.text for o in model.generate_until(requests(False, kwargs, n=2))]
    again = [o.text for o in model.generate_until(requests(False, kwargs, n=2))]
    assert first == again, "sampling is seeded per request"
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert all(r["greedy"] is False and r["text_match"] is None for r in records)


def test_throughput_reaches_lmms_eval(sd_models: dict, monkeypatch: pytest.MonkeyPatch):
    from lmms_eval.models.model_utils.gen_metrics import (reset_logged_metrics,
                                                          summarize_logged_metrics)

    reset_logged_metrics()
    out = shared(sd_models["llava"], monkeypatch).generate_until(requests(False, GREEDY))
    summary = summarize_logged_metrics()
    assert summary["total_gen_tokens"] == sum(o.token_counts.output_tokens for o in out)
    assert summary["avg_requests"] == 3 and summary["avg_mismatches"] == 0
    for key in ("avg_tau", "avg_acceptance_rate", "avg_speedup", "avg_target_forwards_per_token",
                "avg_t/tau", "avg_latency"):
        assert key in summary, key
    assert summary["avg_tau"] > 1


def test_num_beams_above_one_fails_the_request(sd_models: dict, monkeypatch: pytest.MonkeyPatch):
    model = shared(sd_models["llava"], monkeypatch)
    with pytest.raises(ValueError, match="num_beams=2"):
        model.generate_until(requests(False, {**GREEDY, "num_beams": 2}, n=1))


# ---------------------------------------------------------------------------- construction errors

def test_create_from_arg_string_takes_the_cli_settings(tiny_paths: dict):
    """How lmms-eval builds the model: our raw model_args plus its batch_size/device/..."""
    cls, target = model_class("llava"), tiny_paths["llava"]["target"]
    cli = {"batch_size": "1", "max_batch_size": None, "device": None}
    model = cls.create_from_arg_string(f"pretrained={target},sd=off,seed=0007", cli)
    assert model.drafter is None and model.settings.seed == 7 and model.device.type == "cpu"
    with pytest.raises(ValueError, match="batch_size must be 1"):
        cls.create_from_arg_string(f"pretrained={target}", {**cli, "batch_size": "4"})


def test_unknown_tree_name_and_parameter(tiny_paths: dict):
    target = tiny_paths["llava"]["target"]
    with pytest.raises(ValueError, match="unknown tree builder 'bush'"):
        make_model("llava", pretrained=target, draft=target, tree="bush")
    with pytest.raises(ValueError, match="'depth'"):
        make_model("llava", pretrained=target, draft=target, **{"tree.depth": 3})


def test_missing_draft(tiny_paths: dict, tmp_path: Path):
    target = tiny_paths["llava"]["target"]
    with pytest.raises(ValueError, match="needs draft="):
        make_model("llava", pretrained=target)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_model("llava", pretrained=target, draft=tmp_path / "nowhere")


def test_mismatched_vocabularies(tiny_paths: dict):
    with pytest.raises(ValueError, match="tokenizers differ"):
        make_model("llava", pretrained=tiny_paths["llava"]["target"],
                   draft=tiny_paths["qwen2_vl"]["text_only"])


def test_target_of_the_wrong_family(tiny_paths: dict):
    with pytest.raises(ValueError, match="needs a llava target"):
        make_model("llava", pretrained=tiny_paths["qwen2_vl"]["target"], sd="off")


def test_text_only_draft_runs(tiny_paths: dict, family: str):
    model = make_model(family, chat=True, pretrained=tiny_paths[family]["target"], baseline=True,
                       draft=tiny_paths[family]["text_only"])
    assert model.drafter.text_only
    assert model.generate_until(requests(True, GREEDY, n=1))[0].text


def test_one_untimed_warm_up_then_alternating_baseline_order(sd_models: dict,
                                                             monkeypatch: pytest.MonkeyPatch):
    import lmms_sd.api as api  # the shared decoder the model classes decode with

    speculative: list[bool] = []  # per core decode: with a drafter?
    real = api.generate
    monkeypatch.setattr(api, "generate",
                        lambda *a, **k: speculative.append(a[3] is not None) or real(*a, **k))
    model = shared(sd_models["llava"], monkeypatch)
    monkeypatch.setattr(model, "_warm", False)
    monkeypatch.setattr(model, "_served", 0)
    model.generate_until(requests(False, GREEDY, n=2))
    # warm-up (sd, ar); request 0 (sd, ar); request 1 (ar first, then sd)
    assert speculative == [True, False, True, False, False, True]
    model.generate_until(requests(False, GREEDY, n=1))
    assert speculative[6:] == [True, False], "one warm-up per model, not per call"


def test_auto_tree_is_planned_at_start_up_and_recorded(tiny_paths: dict, noisy_drafts: dict,
                                                       tmp_path: Path):
    from lmms_eval.models.model_utils.gen_metrics import (reset_logged_metrics,
                                                          summarize_logged_metrics)

    reset_logged_metrics()
    model = make_model("llava", pretrained=tiny_paths["llava"]["target"],
                       draft=noisy_drafts["llava"], baseline=True)  # the default tree: auto
    assert model.decoder.method.auto is not None and model.decoder.builder is None
    out, records = records_of(model, False, tmp_path / "s.jsonl", n=3)
    plan = model.startup.plan
    assert all(r["text_match"] for r in records) and all(o.text for o in out)
    assert [r["tree"]["tree"] for r in records] == [plan.spec] * 3
    assert [r["baseline_first"] for r in records] == [False, True, False]
    assert model.startup.probe_steps > 0 and 0 < sum(model.startup.acceptance) <= 1
    summary = summarize_logged_metrics()
    assert summary[f"avg_auto_tree/{plan.kind}"] == 1
    assert summary["avg_auto_tree/nodes"] == plan.nodes


# ---------------------------------------------------------------------------- other methods

def records_of(model: Any, chat: bool, path: Path, n: int = 2) -> tuple[list, list[dict]]:
    model.settings = dataclasses.replace(model.settings, stats_path=str(path))
    out = model.generate_until(requests(chat, GREEDY, n=n))
    return out, [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def msd_heads(tiny_paths: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per family, a fresh (untrained) MSD head saved in the published layout."""
    from lmms_sd.adapters.loading import VLM_FAMILIES
    from lmms_sd.drafters.msd_format import new_msd_head, save_msd_head

    root = tmp_path_factory.mktemp("msd_heads")
    torch.manual_seed(0)
    return {f: save_msd_head(new_msd_head(VLM_FAMILIES[f][0].from_pretrained(p["target"])),
                             root / f) for f, p in tiny_paths.items()}


def test_msd_head_is_lossless(tiny_paths: dict, msd_heads: dict, family: str, tmp_path: Path):
    """The point is the plumbing of target features and positions, not the head's quality."""
    model = make_model(family, chat=True, method="MSD", pretrained=tiny_paths[family]["target"],
                       draft=msd_heads[family], baseline=True, tree="dynamic",
                       **{"tree.depth": 3, "tree.top_k": 4, "tree.total_tokens": 8})
    out, records = records_of(model, True, tmp_path / "s.jsonl")
    assert all(r["text_match"] for r in records) and all(o.text for o in out)
    assert all(r["stats"]["draft_forwards"] > 0 for r in records)


def test_msd_startup_choice_of_total_tokens(tiny_paths: dict, msd_heads: dict, tmp_path: Path):
    """MSD's total_token=-1: the dynamic tree's size is chosen at start-up among MSD's sizes."""
    from lmms_sd.trees.auto import MSD_TOTALS

    model = make_model("llava", method="MSD", pretrained=tiny_paths["llava"]["target"],
                       draft=msd_heads["llava"], baseline=True, tree="dynamic",
                       **{"tree.total_tokens": -1, "tree.depth": 3})
    out, records = records_of(model, False, tmp_path / "s.jsonl")
    plan = model.startup.plan
    assert plan.kind == "dynamic" and int(plan.params["total_tokens"]) in MSD_TOTALS
    assert plan.params["depth"] == "3" and all(r["text_match"] for r in records)


@pytest.mark.parametrize("steering", ["thesis", "replace"])
def test_calibrated_msd_measures_only_after_calibration(tiny_paths: dict, msd_heads: dict,
                                                       tmp_path: Path, steering: str):
    """train_ratio 0.5 of 2 requests: the first collects traces (not measured, no baseline),
    the second is decoded with the fitted calibrator and measured. The traces carry the MSD
    head's own image attention."""
    from lmms_eval.models.model_utils.gen_metrics import (reset_logged_metrics,
                                                          summarize_logged_metrics)

    model = make_model("llava", method="MSDCalibrated", pretrained=tiny_paths["llava"]["target"],
                       draft=msd_heads["llava"], baseline=True,
                       **{"cal.train_ratio": 0.5, "cal.nodes": 6, "cal.max_depth": 3,
                          "cal.min_samples": 1, "cal.steering": steering})
    reset_logged_metrics()
    _, records = records_of(model, False, tmp_path / "s.jsonl")
    assert model.decoder.method.session.builder.steering == steering
    assert [(r["measured"], r["calibrated"]) for r in records] == [(False, False), (True, True)]
    traces = [r for task in model.decoder.method.session.summary() for r in model.decoder.method.session.traces(task)]
    assert traces and max(r.features.attention for r in traces) > 0
    assert records[0]["baseline"] is None and records[1]["text_match"] is True
    summary = summarize_logged_metrics()
    assert summary["avg_requests"] == 1 and summary["avg_unmeasured_requests"] == 1


def test_calibrated_msd_settings_errors(tiny_paths: dict):
    target = tiny_paths["llava"]["target"]
    with pytest.raises(ValueError, match="'tree'"):
        make_model("llava", method="MSDCalibrated", pretrained=target, tree="opt")
    with pytest.raises(ValueError, match="'nodez'"):
        make_model("llava", method="MSDCalibrated", pretrained=target, **{"cal.nodez": 3})
    with pytest.raises(ValueError, match="train_ratio"):
        make_model("llava", method="MSDCalibrated", pretrained=target, **{"cal.train_ratio": 1})


def test_cascade_is_lossless_and_counts_its_reviews(tiny_paths: dict, noisy_drafts: dict,
                                                     tmp_path: Path):
    model = make_model("llava", method="Cascade", pretrained=tiny_paths["llava"]["target"],
                       drafts=f"{noisy_drafts['llava']};mag", k_matrix="2 1;0 2", baseline=True)
    out, records = records_of(model, False, tmp_path / "s.jsonl")
    assert all(r["text_match"] for r in records)
    assert all(len(r["cascade"]["reviews"]) == 2 for r in records)
    assert sum(r["stats"]["accepted"] for r in records) > 0


@pytest.mark.parametrize("extra", [{}, {"bottom_tokens": 10, "mag_match": "earliest"}],
                         ids=["ours", "published_mag"])
def test_cascade_of_mag_alone_runs_with_published_defaults(tiny_paths: dict, tmp_path: Path,
                                                           extra: dict):
    # drafts=mag and nothing else: CS Drafting's k_matrix [[10]] for one draft; lossless
    model = make_model("qwen2_vl", method="Cascade", pretrained=tiny_paths["qwen2_vl"]["target"],
                       drafts="mag", baseline=True, **extra)
    out, records = records_of(model, False, tmp_path / "s.jsonl")
    assert model.drafter.cfg.k_matrix == ((10,),)
    assert all(r["text_match"] for r in records)
    assert {n for r in records for n in r["cascade"]["chain_lengths"]} == {10}


def test_cascade_settings_errors(tiny_paths: dict):
    target = tiny_paths["llava"]["target"]
    with pytest.raises(ValueError, match="k_matrix='2,1'"):
        make_model("llava", method="Cascade", pretrained=target, drafts="mag", k_matrix="2,1")
    with pytest.raises(ValueError, match="needs drafts="):
        make_model("llava", method="Cascade", pretrained=target, k_matrix="2")
    with pytest.raises(ValueError, match="'draft'"):
        make_model("llava", method="Cascade", pretrained=target, draft="mag")


# ---------------------------------------------------------------------------- the real CLI

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class CliRun:
    results: dict          # the results JSON lmms-eval wrote
    records: list[dict]    # our per-sample speed JSONL beside it
    outputs: dict          # (task, doc_id) -> the model's answer, from lmms-eval's samples


def run_cli(out: Path, model: str, model_args: str, tasks: str, limit: int,
            processes: int = 1, launcher: tuple[str, ...] = ("-m", "lmms_eval")) -> CliRun:
    """Run lmms-eval on the shapes tasks and read back what it wrote. lmms-eval exits 0 on
    many errors: the files, not the exit code, are the proof."""
    from lmms_sd.lmms_eval import tasks_dir

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [*launcher, "--model", model, "--model_args", model_args, "--tasks", tasks,
            "--limit", str(limit), "--gen_kwargs", "max_new_tokens=24", "--log_samples",
            "--output_path", str(out), "--verbosity", "DEBUG"]
    if launcher[:2] == ("-m", "lmms_eval"):
        args += ["--include_path", str(tasks_dir())]
    cmd = [sys.executable, *args]
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(processes), "--main_process_port", str(free_port()), *args]
    proc = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True,
                          timeout=1200)
    log = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log
    results_files = list(out.glob("*/*_results.json"))
    assert len(results_files) == 1, f"expected one results file in {out}\n{log}"
    results_file = results_files[0]
    date = results_file.name.removesuffix("_results.json")
    speed = results_file.with_name(f"{date}_speed.jsonl")
    outputs = {}
    for samples in results_file.parent.glob(f"{date}_samples_*.jsonl"):
        task = samples.stem.removeprefix(f"{date}_samples_")
        for line in samples.read_text().splitlines():
            s = json.loads(line)
            outputs[task, s["doc_id"]] = s["filtered_resps"]
    return CliRun(json.loads(results_file.read_text()),
                  [json.loads(line) for line in speed.read_text().splitlines()], outputs)


@pytest.fixture(scope="module")
def cli_sd(tiny_paths: dict, noisy_drafts: dict,
           tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    args = f"pretrained={tiny_paths['llava']['target']},draft={noisy_drafts['llava']},baseline=true"
    return run_cli(tmp_path_factory.mktemp("cli_sd") / "out", "llava_sd", args,
                   "shapes_caption", limit=4)


@pytest.mark.slow
def test_cli_reports_accuracy_and_consistent_speed(cli_sd: CliRun):
    """The results JSON against figures recomputed here from the raw per-sample JSONL (tokens,
    per-step lists, wall times) and from the task's scorer on the logged answers."""
    import pandas as pd

    from lmms_sd.data.shapes import Content, score
    from lmms_sd.lmms_eval import tasks_dir

    records, throughput = cli_sd.records, cli_sd.results["throughput"]
    assert sorted(r["doc_id"] for r in records) == [0, 1, 2, 3]
    assert all(r["task"] == "shapes_caption" and r["text_match"] for r in records)
    assert all(r["mismatch"] is None for r in records)
    docs = pd.read_parquet(tasks_dir() / "shapes" / "shapes_test.parquet")
    docs = docs[docs["topic"] == "describe"].reset_index(drop=True)
    scores = [score(cli_sd.outputs["shapes_caption", i][0], Content.from_json(docs["content"][i]))
              for i in range(4)]
    acc = cli_sd.results["results"]["shapes_caption"]["content_acc,none"]
    assert acc == pytest.approx(sum(scores) / 4)
    st = [r["stats"] for r in records]
    tokens = sum(len(s["tokens"]) for s in st)
    steps = sum(len(s["accepted_per_step"]) for s in st)
    accepted = sum(sum(s["accepted_per_step"]) for s in st)
    for s in st:  # each record: per-step counts and origin describe exactly the emitted tokens
        assert sum(a + 1 for a in s["accepted_per_step"]) == len(s["tokens"]) - 1
        assert len(s["origin"]) == len(s["tokens"]) and s["origin"][0] == "t"
    tps = tokens / sum(s["wall_time"] for s in st)
    base_tps = (sum(len(r["baseline"]["tokens"]) for r in records)
                / sum(r["baseline"]["wall_time"] for r in records))
    want = {"tau": (accepted + steps) / steps,
            "acceptance_rate": accepted / sum(sum(s["tree_depth_per_step"]) for s in st),
            "target_forwards_per_token": (len(st) + steps) / tokens,  # prefill + one per step
            "speedup": tps / base_tps}
    assert throughput["total_gen_tokens"] == tokens
    assert throughput["avg_requests"] == 4 and throughput["avg_mismatches"] == 0
    assert throughput["avg_tie_mismatches"] == throughput["avg_real_mismatches"] == 0
    for key, value in want.items():
        assert throughput[f"avg_{key}"] == pytest.approx(value), key
        assert throughput[f"avg_shapes_caption/{key}"] == pytest.approx(value), key
    assert 1 < throughput["avg_tau"], "the noisy draft should get some tokens accepted"
    assert cli_sd.results["config"]["model_backend"].endswith("LlavaSDChat (chat)")


@pytest.mark.slow
def test_cli_outputs_equal_an_sd_off_run(cli_sd: CliRun, tiny_paths: dict,
                                         tmp_path_factory: pytest.TempPathFactory):
    """The sd=off run goes through ``eval_main``, which adds lmms_sd's tasks itself."""
    off = run_cli(tmp_path_factory.mktemp("cli_off") / "out", "llava_sd",
                  f"pretrained={tiny_paths['llava']['target']},sd=off", "shapes_caption", limit=4,
                  launcher=("-c", "import lmms_sd.lmms_eval as m; raise SystemExit(m.eval_main())"))
    assert len(cli_sd.outputs) == 4 and off.outputs == cli_sd.outputs
    assert off.results["throughput"]["avg_tau"] == 1.0
    assert "avg_acceptance_rate" not in off.results["throughput"]


@pytest.mark.slow
def test_cli_two_processes_gather_every_doc(tiny_paths: dict, noisy_drafts: dict,
                                            tmp_path_factory: pytest.TempPathFactory):
    """3 docs per task over 2 ranks: the evaluator pads rank 1 with duplicates, which must
    neither be decoded nor counted; rank 0 reports everyone's records once."""
    args = f"pretrained={tiny_paths['qwen2_vl']['target']},draft={noisy_drafts['qwen2_vl']}"
    run = run_cli(tmp_path_factory.mktemp("cli_2p") / "out", "qwen2_vl_sd", args, "shapes",
                  limit=3, processes=2)
    keys = [(r["task"], r["doc_id"]) for r in run.records]
    want = {(t, i) for t in ("shapes_caption", "shapes_qa") for i in range(3)}
    assert len(keys) == len(set(keys)) and set(keys) == want
    assert {r["rank"] for r in run.records} == {0, 1}
    assert run.results["throughput"]["avg_requests"] == 6
    assert run.results["throughput"]["total_gen_tokens"] == sum(
        r["stats"]["new_tokens"] for r in run.records)
    assert set(run.outputs) == want
    assert {"shapes_caption", "shapes_qa"} <= set(run.results["results"])

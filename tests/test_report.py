"""``lmms-sd report``: leaderboard rows read from lmms-eval output folders.

Synthetic run folders are written in lmms-eval 0.7.3's layout (``<out>/<model>/<date>_results.json``
and our ``<date>_speed.jsonl`` beside it), with a throughput section made by the real
``speed.log_speed`` and lmms-eval's own ``summarize_logged_metrics``; one real CLI run (two trees
in one lmms-eval process, via ``--config``) checks the real files. Expected figures are computed
here from the records' raw counts.
"""
from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmms_sd import cli
from lmms_sd.report import ALL_TASKS, ReportError, report
from lmms_sd.report.load import load_runs

BACKEND = "lmms_sd.lmms_eval.models.LlavaSDChat (chat)"


# ---------------------------------------------------------------------------- synthetic runs

def stats(rng: random.Random, k: int, steps: int, tps: float) -> dict:
    accepted = [rng.randint(0, k) for _ in range(steps)]
    new = sum(accepted) + steps
    return {"new_tokens": new, "decode_steps": steps, "accepted_per_step": accepted,
            "accepted": sum(accepted), "drafted": k * steps, "target_forwards": steps + 1,
            "draft_forwards": k * steps, "wall_time": new / tps}


def records(task: str, docs: range, rank: int, seed: int, k: int = 4, tps: float = 100.0,
            match: bool = True) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for doc in docs:
        base = stats(rng, 0, rng.randint(8, 30), 60.0)
        out.append({"task": task, "doc_id": doc, "rank": rank, "device": "cpu", "threads": 1,
                    "greedy": True, "stats": stats(rng, k, rng.randint(2, 9), tps * (1 + rank)),
                    "baseline": base, "text_match": match})
    return out


def throughput(recs: list[dict]) -> dict:
    """What a run's results JSON holds: our log_speed through lmms-eval's own summary."""
    from lmms_eval.models.model_utils.gen_metrics import (reset_logged_metrics,
                                                          summarize_logged_metrics)

    from lmms_sd.lmms_eval.speed import log_speed

    reset_logged_metrics()
    log_speed(recs)
    return summarize_logged_metrics()


def write_run(out: Path, recs: list[dict] | None, acc: dict[str, float], n: dict[str, int],
              model_args: str, date: str, backend: str = BACKEND, model: str = "llava_sd",
              version: str = "unknown@unknown") -> Path:
    """One run folder as lmms-eval 0.7.3 writes it (the keys the report reads, and a few more)."""
    folder = out / "llava__target"
    folder.mkdir(parents=True, exist_ok=True)
    results = {
        "results": {t: {"alias": t, "content_acc,none": a, "content_acc_stderr,none": 0.01}
                    for t, a in acc.items()},
        "configs": {t: {"task": t, "metric_list": [{"metric": "content_acc",
                                                    "aggregation": "mean"}]} for t in acc},
        "versions": {t: 1.0 for t in acc}, "group_subtasks": {t: [] for t in acc},
        "n-samples": {t: {"original": 48, "effective": n[t]} for t in acc},
        "config": {"model": model, "model_args": model_args, "model_backend": backend,
                   "batch_size": "1", "device": None, "limit": 8.0},
        "git_hash": None, "lmms_eval_version": version, "date": date,
        "model_name": "/m/llava/target", "model_name_sanitized": "llava__target"}
    if recs is not None:
        results["throughput"] = throughput(recs)
        (folder / f"{date}_speed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    path = folder / f"{date}_results.json"
    path.write_text(json.dumps(results))
    return path


ARGS = "pretrained=/m/llava/target,draft=/m/llava/draft_vlm,baseline=true"


def pooled(recs: list[dict]) -> dict[str, float]:
    """tau, acceptance, tokens/s and speedup from raw sums (written out here, not imported)."""
    s = lambda key, part="stats": sum(r[part][key] for r in recs)  # noqa: E731
    tps = s("new_tokens") / s("wall_time")
    base = s("new_tokens", "baseline") / s("wall_time", "baseline")
    return {"tau": (s("accepted") + s("decode_steps")) / s("decode_steps"),
            "acceptance_rate": s("accepted") / s("drafted"), "tokens_per_second": tps,
            "baseline_tokens_per_second": base, "speedup": tps / base}


def row_of(rows: list, task: str, tree: str | None = None):
    return next(r for r in rows if r.task == task and (tree is None or r.config.tree == tree))


# ---------------------------------------------------------------------------- pooling

def test_ranks_and_runs_of_one_configuration_pool_raw_counts(tmp_path: Path):
    """Run A: 2 ranks, rank 1 twice as fast; run B: other docs, 3 times as fast. The pooled row
    divides sums; the mean of the two runs' own figures is a different number."""
    a = (records("shapes_caption", range(0, 6, 2), 0, 1)
         + records("shapes_caption", range(1, 6, 2), 1, 2))
    b = records("shapes_caption", range(6, 14), 0, 3, tps=300.0)
    write_run(tmp_path / "a", a, {"shapes_caption": 0.5}, {"shapes_caption": 6},
              ARGS + ",tree=chain,tree.k=4", "20261203_100000")
    write_run(tmp_path / "b", b, {"shapes_caption": 0.75}, {"shapes_caption": 8},
              ARGS + ",tree=chain,tree.k=4", "20261203_110000")
    rows = report([tmp_path], tmp_path / "out")
    assert [r.task for r in rows] == ["shapes_caption", ALL_TASKS]
    row = rows[0]
    want = pooled(a + b)
    for key, value in want.items():
        assert row.speed[key] == pytest.approx(value), key
    mean_of_runs = (pooled(a)["speedup"] + pooled(b)["speedup"]) / 2
    assert abs(row.speed["speedup"] - mean_of_runs) > 0.01, "pooling must not average averages"
    assert row.metrics["content_acc"] == pytest.approx((0.5 * 6 + 0.75 * 8) / 14)
    assert (row.samples, row.runs, row.date) == (14, 2, "2026-12-03 03:00")  # UTC+8 -> UTC
    assert rows[1].speed["tau"] == pytest.approx(want["tau"]) and rows[1].metrics == {}


def test_mismatches_split_into_ties_and_real_and_mark_the_run(tmp_path: Path):
    recs = records("shapes_caption", range(4), 0, 5)
    recs[1].update(text_match=False, mismatch={"kind": "tie", "position": 3})
    recs[2].update(text_match=False, mismatch={"kind": "real", "position": 5})
    write_run(tmp_path / "a", recs, {"shapes_caption": 0.5}, {"shapes_caption": 4},
              ARGS + ",tree=chain", "20261203_100000")
    rows = report([tmp_path / "a"], tmp_path / "out")
    assert (rows[0].mismatches.tie, rows[0].mismatches.real) == (1, 1)
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "| ! llava_sd |" in md and "| 1/1 |" in md and "not a lossless" in md

    del recs[2]["mismatch"]  # a run before the tie/real classification: plain count, marked
    write_run(tmp_path / "b", recs, {"shapes_caption": 0.5}, {"shapes_caption": 4},
              ARGS + ",tree=chain", "20261203_100000")
    rows = report([tmp_path / "b"], tmp_path / "out_b")
    assert rows[0].mismatches.total == 2 and rows[0].mismatches.tie is None
    assert "| ! llava_sd |" in (tmp_path / "out_b" / "leaderboard.md").read_text()


# ---------------------------------------------------------------------------- errors

def test_folder_without_results_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ReportError, match="no lmms-eval results"):
        load_runs([tmp_path / "empty"])
    assert cli.main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no lmms-eval results" in capsys.readouterr().err


def test_other_model_classes_get_accuracy_only_rows(tmp_path: Path, capsys: pytest.CaptureFixture):
    write_run(tmp_path / "hf", None, {"shapes_qa": 0.9}, {"shapes_qa": 8},
              "pretrained=llava-hf/llava-1.5-7b-hf,dtype=bfloat16", "20261203_100000",
              backend="lmms_eval.models.chat.llava_hf.LlavaHf (chat)", model="llava_hf")
    rows = report([tmp_path / "hf"], tmp_path / "out")
    assert rows[0].metrics == {"content_acc": 0.9} and rows[0].speed == {}
    assert (rows[0].config.model, rows[0].config.dtype) == ("llava_hf", "bfloat16")
    assert "not an lmms_sd model class" in capsys.readouterr().err
    with (tmp_path / "out" / "leaderboard.csv").open() as f:
        line = next(r for r in csv.DictReader(f) if r["task"] == "shapes_qa")
    assert line["content_acc"] == "0.9" and line["tau"] == "" and line["speedup"] == ""


def test_mixed_lmms_eval_versions_are_an_error(tmp_path: Path):
    for name, version in (("a", "main@1234abcd"), ("b", "main@99990000")):
        write_run(tmp_path / name, records("shapes_qa", range(2), 0, 1), {"shapes_qa": 1.0},
                  {"shapes_qa": 2}, ARGS, "20261203_100000", version=version)
    with pytest.raises(ReportError, match="different lmms-eval versions.*main@1234abcd"):
        load_runs([tmp_path / "a", tmp_path / "b"])


def test_missing_or_foreign_speed_jsonl_is_an_error(tmp_path: Path):
    path = write_run(tmp_path / "a", records("shapes_qa", range(3), 0, 1), {"shapes_qa": 1.0},
                     {"shapes_qa": 3}, ARGS, "20261203_100000")
    jsonl = path.with_name("20261203_100000_speed.jsonl")
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records("shapes_qa", range(2), 0, 9)))
    with pytest.raises(ReportError, match="belongs to another run"):
        load_runs([tmp_path / "a"])
    jsonl.unlink()
    with pytest.raises(ReportError, match="speed JSONL of this lmms_sd run is missing"):
        load_runs([tmp_path / "a"])


def test_model_args_of_another_lmms_sd_version_are_an_error(tmp_path: Path):
    write_run(tmp_path / "a", records("shapes_qa", range(2), 0, 1), {"shapes_qa": 1.0},
              {"shapes_qa": 2}, ARGS + ",draft_temperature=0.5", "20261203_100000")
    with pytest.raises(ReportError, match="do not fit.*'draft_temperature'"):
        load_runs([tmp_path / "a"])


# ---------------------------------------------------------------------------- the real CLI

@pytest.fixture(scope="session")
def two_tree_runs(tiny_paths: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One lmms-eval process, two runs of one target and draft: a chain and a dynamic tree.
    The draft is the target itself (the random tiny draft VLM gets nothing accepted)."""
    from lmms_sd.lmms_eval import tasks_dir

    root = tmp_path_factory.mktemp("report_cli")
    paths = tiny_paths["llava"]
    base = f"pretrained={paths['target']},draft={paths['target']},baseline=true"
    runs = [{"model": "llava_sd", "model_args": f"{base},{tree}", "tasks": "shapes",
             "include_path": str(tasks_dir()), "limit": 2, "gen_kwargs": "max_new_tokens=12",
             "batch_size": "1", "output_path": str(root / name), "verbosity": "DEBUG"}
            for name, tree in (("chain", "tree=chain,tree.k=3"),
                               ("dynamic", "tree=dynamic,tree.total_tokens=8,tree.depth=3"))]
    (root / "runs.yaml").write_text(yaml.safe_dump(runs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "lmms_eval", "--config", str(root / "runs.yaml"),
                           "--verbosity", "DEBUG"], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.slow
def test_report_of_two_trees_equals_their_results_json(two_tree_runs: Path, capsys):
    out = two_tree_runs / "report"
    assert cli.main(["report", str(two_tree_runs / "chain"), str(two_tree_runs / "dynamic"),
                     "--out", str(out)]) == 0
    for name in ("leaderboard.md", "leaderboard.csv", "accuracy_vs_speedup.png",
                 "tau_per_task.png", "accepted_lengths.png"):
        assert (out / name).stat().st_size > 0, name
    with (out / "leaderboard.csv").open() as f:
        lines = list(csv.DictReader(f))
    assert {line["tree"] for line in lines} == {"chain(k=3)", "dynamic(depth=3,total_tokens=8)"}
    for run in ("chain", "dynamic"):
        [results_file] = (two_tree_runs / run).glob("*/*_results.json")
        results = json.loads(results_file.read_text())
        recs = [json.loads(x) for x in results_file.with_name(
            results_file.name.replace("_results.json", "_speed.jsonl")).read_text().splitlines()]
        tree = next(line["tree"] for line in lines if line["tree"].startswith(run))
        mine = {line["task"]: line for line in lines if line["tree"] == tree}
        assert set(mine) == {"shapes", "shapes_caption", "shapes_qa", ALL_TASKS}
        for task in ("shapes_caption", "shapes_qa", ALL_TASKS):
            key = "" if task == ALL_TASKS else f"{task}/"
            want = pooled([r for r in recs if task == ALL_TASKS or r["task"] == task])
            for col in ("tau", "speedup"):
                got = float(mine[task][col])
                assert got == pytest.approx(results["throughput"][f"avg_{key}{col}"]), (task, col)
                assert got == pytest.approx(want[col]), (task, col)
            if task != ALL_TASKS:
                acc = results["results"][task]["content_acc,none"]
                assert float(mine[task]["content_acc"]) == acc
            assert mine[task]["device"] == "cpu x1"
        tau_all = pooled(recs)["tau"]
        assert float(mine["shapes"]["tau"]) == pytest.approx(tau_all), "the group pools both"
        assert tau_all > 1.0, "the target drafting for itself gets its tokens accepted"
    assert "| llava_sd |" in capsys.readouterr().out


def test_demo_compare_runs_every_shipped_drafter(tmp_path: Path):
    from lmms_sd import demo

    runs = demo.compare_config("llava", "shapes_caption", 4, tmp_path)
    assert [r["model"] for r in runs] == ["llava_sd", "llava_sd", "llava_msd", "llava_cascade",
                                          "llava_msd_calibrated"]
    assert len({r["output_path"] for r in runs}) == 5 and all(r["limit"] == 4 for r in runs)
    for r in runs:
        args = dict(item.split("=", 1) for item in r["model_args"].split(","))
        drafts = args.get("draft") or args["drafts"]
        for path in drafts.split(";"):
            assert path == "mag" or Path(path, "config.json").is_file(), path

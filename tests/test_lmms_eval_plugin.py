"""The lmms-eval layer: speed aggregation, registration, model construction, and real CLI runs."""
from __future__ import annotations

import pytest

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

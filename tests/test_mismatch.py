"""Greedy mismatch diagnosis (``baseline=true``): ties vs real mismatches, from top-2 logit gaps."""
from __future__ import annotations


import torch

from lmms_sd.core.tree import DraftTree
from lmms_sd.core.verify import Verdict
from lmms_sd.lmms_eval.mismatch import GapRecorder, classify, tie_tolerance


def recorder(gaps: list[float], top: float = 10.0) -> GapRecorder:
    rec = GapRecorder()
    rec.gaps, rec.tops = list(gaps), [top] * len(gaps)
    return rec


def test_recorder_reads_the_rows_that_chose_the_emitted_tokens():
    # a tree root -> {0, 1}, 1 -> 2; the path 1, 2 accepted: rows 0 (root), 2 (after node 1),
    # 3 (after node 2) chose the three emitted tokens
    tree = DraftTree(torch.tensor([4, 5, 6]), torch.tensor([-1, -1, 1]))
    logits = torch.zeros(4, 8)
    for row, (a, b) in enumerate([(3.0, 1.0), (9.0, 0.0), (2.0, 1.5), (7.0, 6.75)]):
        logits[row, 0], logits[row, 7] = a, b
    rec = GapRecorder()
    rec(tree, logits, Verdict([1, 2], 0))
    assert rec.gaps == [2.0, 0.5, 0.25] and rec.tops == [3.0, 2.0, 7.0]


def test_equal_outputs_are_no_mismatch():
    assert classify([1, 2, 3], [1, 2, 3], recorder([1, 1]), recorder([1, 1]), torch.float32) is None


def test_a_tie_in_either_run_is_a_tie():
    # first difference at token 2: the gap there (index 1) is tiny in the autoregressive run only
    m = classify([1, 2, 3, 4], [1, 2, 5, 6], recorder([1.0, 2.0, 1.0]),
                 recorder([1.0, 1e-6, 1.0]), torch.float32)
    assert (m.position, m.gap_sd, m.gap_ar, m.kind) == (2, 2.0, 1e-6, "tie")


def test_a_clear_gap_in_both_runs_is_real():
    m = classify([1, 2, 3], [1, 7, 3], recorder([0.5, 1.0]), recorder([0.3, 1.0]), torch.float32)
    assert (m.position, m.kind) == (1, "real")


def test_tolerance_follows_the_dtype_and_the_logit_scale():
    # a 0.05 gap at logits near 10 is rounding in bfloat16, a real difference in float32
    sd, ar = recorder([0.05]), recorder([0.05])
    assert classify([1, 2], [1, 3], sd, ar, torch.bfloat16).kind == "tie"
    assert classify([1, 2], [1, 3], sd, ar, torch.float32).kind == "real"
    assert tie_tolerance(torch.float16, 100.0) == 100 * tie_tolerance(torch.float16, 0.5)


def test_a_real_mismatch_is_an_error_in_the_log():
    from loguru import logger

    from lmms_sd.lmms_eval.base import log_mismatch

    logged: list[tuple[str, str]] = []
    sink = logger.add(lambda m: logged.append((m.record["level"].name, m.record["message"])))
    try:
        found = classify([1, 2], [1, 3], recorder([1.0]), recorder([2.0]), torch.float32)
        log_mismatch("t", 3, found, "a b", "a c")
    finally:
        logger.remove(sink)
    found = found.to_dict()
    assert found["kind"] == "real" and found["position"] == 1
    assert logged[-1][0] == "ERROR" and "t doc 3" in logged[-1][1]

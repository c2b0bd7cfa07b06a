"""tree=auto's planner on hand-made cost curves (pure: no model, no timing)."""
from __future__ import annotations

import pytest

from lmms_sd.trees import make_builder
from lmms_sd.trees.auto import CostCurve, SearchSpace, StepCosts, level_rows, plan_tree
from lmms_sd.trees.growmap import TreeShape
from lmms_sd.trees.sequoia_dp import sequoia_plan

ACC = (0.7, 0.15, 0.05, 0.02)
T1 = 2e-3


def flat(seconds: float) -> CostCurve:
    return CostCurve((1, 64), (seconds, seconds))


def steep(t1: float) -> CostCurve:  # every verified token costs a full forward
    return CostCurve((1, 64), (t1, 64 * t1))


def test_flat_cost_and_free_drafts_pick_a_big_tree() -> None:
    plan = plan_tree(ACC, StepCosts(flat(T1), flat(0.0)))
    assert plan.kind in ("static", "dynamic") and plan.nodes >= 32, plan


def test_steep_cost_picks_a_short_chain() -> None:
    plan = plan_tree(ACC, StepCosts(steep(T1), flat(0.05 * T1)))
    assert plan.kind == "chain" and plan.nodes <= 2, plan


def test_chain_choice_matches_the_closed_form() -> None:
    # a chain of k with rank-0 acceptance a emits (1 - a^(k+1)) / (1 - a) tokens per step and
    # costs verify(k + 1) + k draft forwards
    a, d = 0.8, 0.3 * T1
    verify = CostCurve((1, 2, 4, 8, 16), (T1, 1.05 * T1, 1.2 * T1, 1.6 * T1, 2.6 * T1))
    space = SearchSpace(kinds=("chain",), max_depth=8)
    plan = plan_tree((a,), StepCosts(verify, flat(d)), space)

    def rate(k: int) -> float:
        return (1 - a ** (k + 1)) / (1 - a) / (verify(k + 1) + k * d)

    best = max(range(1, 9), key=rate)
    assert (plan.kind, plan.params["k"]) == ("chain", str(best))
    assert plan.tokens_per_second == pytest.approx(rate(best))


def test_static_choice_is_sequoias_shape_and_rebuilds() -> None:
    # Sequoia's hardware-aware (budget, depth) choice: kinds=static only
    verify = CostCurve((1, 8, 16, 32, 64), (T1, 1.1 * T1, 1.3 * T1, 2 * T1, 4 * T1))
    plan = plan_tree(ACC, StepCosts(verify, flat(0.1 * T1)), SearchSpace(kinds=("static",)))
    budget, depth = int(plan.params["budget"]), int(plan.params["depth"])
    reference = sequoia_plan(ACC, budget, depth)
    assert plan.expected_accept == pytest.approx(reference.expected_accept)
    assert plan.nodes == reference.shape.size and 1 < plan.nodes < 63
    built = make_builder("static", **plan.params)  # the plan's params name the same tree
    assert built.shape == reference.shape


def test_a_measured_vector_that_rounds_past_one_still_rebuilds() -> None:
    acc = (29 / 31, 1 / 31, 1 / 31, 0.0)  # 4-digit rounding to nearest would sum above 1
    plan = plan_tree(acc, StepCosts(flat(T1), flat(0.0)), SearchSpace(kinds=("static",)))
    assert make_builder("static", **plan.params).shape.size == plan.nodes


def test_msd_startup_choice_is_among_its_sizes() -> None:
    space = SearchSpace(kinds=("dynamic",), dynamic_totals=(39, 47, 49, 55, 59))
    cheap = plan_tree(ACC, StepCosts(flat(T1), flat(0.0)), space)
    assert cheap.params["total_tokens"] == "59"  # flat cost: the biggest of MSD's sizes
    dear = plan_tree(ACC, StepCosts(CostCurve((1, 40, 64), (T1, T1, 3 * T1)), flat(0.0)), space)
    assert int(dear.params["total_tokens"]) < 59


def test_expensive_drafts_shorten_the_tree() -> None:
    verify = CostCurve((1, 64), (T1, 1.5 * T1))
    cheap = plan_tree(ACC, StepCosts(verify, flat(0.01 * T1)))
    dear = plan_tree(ACC, StepCosts(verify, flat(0.8 * T1)))
    assert dear.depth < cheap.depth


def test_level_rows_counts_one_forward_per_expanded_level() -> None:
    assert level_rows(TreeShape.chain(4)) == (1, 1, 1, 1)
    assert level_rows(TreeShape.from_widths((3, 2, 1))) == (1, 3, 6)


def test_cost_curve_interpolates_and_extrapolates() -> None:
    c = CostCurve((1, 4, 8), (1.0, 2.0, 4.0))
    assert c(2) == pytest.approx(4 / 3) and c(12) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="increasing"):
        CostCurve((4, 1), (1.0, 2.0))


def test_bad_acceptance_names_the_problem() -> None:
    with pytest.raises(ValueError, match="summing to at most 1"):
        plan_tree((0.9, 0.5), StepCosts(flat(T1), flat(0.0)))


def test_auto_settings_and_the_special_cases_by_name() -> None:
    from lmms_sd.trees import auto_config
    from lmms_sd.trees.auto import MSD_TOTALS

    assert auto_config("chain", k=3) is None
    msd = auto_config("dynamic", total_tokens="-1", depth="4")
    assert msd.space().kinds == ("dynamic",) and msd.space().dynamic_totals == MSD_TOTALS
    assert msd.dynamic_depth == 4
    sequoia = auto_config("static", budget="-1", max_depth="5")  # Sequoia's: the root counted
    assert sequoia.space().kinds == ("static",) and sequoia.max_depth == 4
    assert auto_config("static", budget="-1", depth="5").max_depth == 5
    assert auto_config("auto", max_nodes="32").max_nodes == 32
    with pytest.raises(ValueError, match="unknown parameter 'k'"):
        auto_config("auto", k="3")
    with pytest.raises(ValueError, match="unknown kinds"):
        auto_config("auto", kinds="chain;bush")


def test_probe_shape_and_rank_counter() -> None:
    import torch

    from lmms_sd.core.tree import DraftTree
    from lmms_sd.core.verify import Verdict
    from lmms_sd.lmms_eval.autotree import RankCounter
    from lmms_sd.trees.auto import probe_shape

    shape = probe_shape(width=3, depth=2)  # root -> 0 1 2 ; node 0 -> 3 4 5
    assert shape.parents == (-1, -1, -1, 0, 0, 0)
    tree = DraftTree(torch.arange(6), torch.tensor(shape.parents))
    counter = RankCounter(3)
    counter(tree, torch.zeros(7, 8), Verdict([0, 4], 9))  # rank 0, then rank 1 (a leaf)
    counter(tree, torch.zeros(7, 8), Verdict([], 9))      # nothing accepted at the root
    counter(tree, torch.zeros(7, 8), Verdict([2], 9))     # rank 2 (a leaf)
    assert counter.counts == [1, 1, 1] and counter.visits == 4
    assert counter.acceptance() == (0.25, 0.25, 0.25)

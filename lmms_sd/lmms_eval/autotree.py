"""``tree=auto`` at start-up: measure, then let ``trees.auto.plan_tree`` pick the tree.

On the first request of a run (decoded untimed: it is also the warm-up):
  1. probe  decode it with the probe tree (``auto.probe_shape``: a rank-0 spine ``max_depth``
            deep, ``probe_width`` ranked children at each spine slot). An observer counts, at every
            spine slot the target reaches, which rank it accepted (or none): the rank-acceptance
            vector of Sequoia's model. The target, drafter and builder calls are timed.
  2. costs  one target forward of n tokens, n in 1, 2, 4, ..., max_nodes, at the end of that
            request's context (causal forwards; medians after warm-up). A draft forward of one
            row is the median drafter call of one row in the probe; of n rows it is assumed to
            grow with n as the target's does. The loop's own seconds per step are what the probe's
            decode time leaves after the target's and the drafter's calls: a fixed part and a
            part per tree node (the builder's own time over the probe's nodes).
  3. plan   ``plan_tree(acceptance, costs, space)``; the builder is ``make_builder(kind,
            **params)``. With no spine slot reached (a one-token answer) the acceptance is 0 and
            the plan is the cheapest tree.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..adapters.timing import COST_SIZES, Timer, TimedProxy, forward_costs
from ..core.generate import GenerationConfig, generate
from ..core.interfaces import Drafter, ModelAdapter, PromptInputs
from ..core.tree import DraftTree
from ..core.verify import Verdict
from ..trees import TreeBuilder, make_builder
from ..trees.auto import AutoConfig, CostCurve, StepCosts, TreePlan, plan_tree, probe_shape
from ..trees.sequoia_dp import load_acceptance
from ..trees.static import StaticBuilder


class RankCounter:
    """A ``generate`` observer: at each slot with children on the accepted path, which child
    rank was accepted (``counts[r]``) out of ``visits`` such slots."""

    def __init__(self, width: int):
        self.counts, self.visits = [0] * width, 0

    def __call__(self, tree: DraftTree, target_logits: torch.Tensor, verdict: Verdict) -> None:
        slot = 0
        for node in verdict.accepted:
            self.counts[tree.children[slot].index(node)] += 1
            self.visits += 1
            slot = node + 1
        if tree.children[slot]:
            self.visits += 1  # reached, nothing accepted

    def acceptance(self) -> tuple[float, ...]:
        if self.visits == 0:
            return (0.0,) * len(self.counts)
        return tuple(c / self.visits for c in self.counts)


@dataclass(frozen=True)
class StartUp:
    """What the start-up measured and chose (``plan``)."""

    plan: TreePlan
    acceptance: tuple[float, ...]
    verify_ms: dict[int, float]
    draft_ms: float
    overhead_ms: float
    overhead_per_node_ms: float
    probe_steps: int

    def to_dict(self) -> dict:
        return {**self.plan.to_dict(), "acceptance": list(self.acceptance),
                "verify_ms": self.verify_ms, "draft_ms": self.draft_ms,
                "overhead_ms": self.overhead_ms, "overhead_per_node_ms": self.overhead_per_node_ms,
                "probe_steps": self.probe_steps}

    def metrics(self) -> dict[str, float]:
        """Numbers for lmms-eval's throughput section (it keeps numbers only)."""
        p = self.plan
        return {f"auto_tree/{p.kind}": 1.0, "auto_tree/nodes": p.nodes, "auto_tree/depth": p.depth,
                "auto_tree/expected_tau": p.tokens_per_step,
                "auto_tree/expected_tokens_per_second": p.tokens_per_second}


def plan_at_startup(target: ModelAdapter, drafter: Drafter, prompt: PromptInputs,
                    cfg: GenerationConfig, auto: AutoConfig,
                    decode: Callable[[Sequence[int]], str] | None = None
                    ) -> tuple[StartUp, TreeBuilder]:
    """Steps 1-3 of the module docstring on ``prompt``; returns the facts and the builder."""
    device = getattr(target, "device", torch.device("cpu"))
    timer, counter = Timer(device), RankCounter(auto.probe_width)
    shape = probe_shape(auto.probe_width, auto.max_depth)
    res = generate(TimedProxy(target, timer, {"forward": "target", "keep": "target",
                                              "crop": "target"}),
                   prompt, cfg, TimedProxy(drafter, timer, {"root": "draft", "expand": "draft"}),
                   timer.timed("builder", StaticBuilder(shape)), decode, observer=counter)
    steps = max(1, res.stats.decode_steps)
    one_row = [s for n, s in timer.rows["draft"] if n == 1] or [0.0]
    draft_1 = statistics.median(one_row)
    own = max(0.0, timer.seconds["builder"] - timer.seconds["draft"]) / steps
    decode_s = res.stats.wall_time - res.stats.prefill_time
    rest = max(0.0, decode_s - timer.seconds["target"] - timer.seconds["builder"]) / steps
    sizes = sorted({n for n in COST_SIZES if n < auto.max_nodes} | {auto.max_nodes})
    verify = forward_costs(target, res.tokens[-1], sizes)
    curve = CostCurve.of(verify)
    per_node = own / shape.size
    costs = StepCosts(curve, curve.scaled(draft_1), rest, per_node)
    acceptance = load_acceptance(auto.acceptance) if auto.acceptance else counter.acceptance()
    plan = plan_tree(acceptance, costs, auto.space())
    facts = StartUp(plan, acceptance, {n: 1e3 * t for n, t in verify.items()}, 1e3 * draft_1,
                    1e3 * rest, 1e3 * per_node, res.stats.decode_steps)
    return facts, make_builder(plan.kind, **plan.params)

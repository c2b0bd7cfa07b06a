"""``tree=auto``: the tree (kind and size) that maximises expected tokens per second, planned from
measured costs and a measured acceptance vector. A pure function of its inputs; the measuring
is done elsewhere (``lmms_sd/adapters/timing.py`` times forwards, ``lmms_sd/lmms_eval/autotree.py``
runs the probe request and calls ``plan_tree``).

Model of one decode step with a tree of N draft nodes and depth D:
  tokens per step   1 + E[accepted], E[accepted] under Sequoia's positional acceptance model
                    (``sequoia_dp.py``): the rank-r child of an accepted node is the one accepted
                    with probability ``acceptance[r]``
  seconds per step  verify(N + 1) + draft cost + overhead + N x overhead per node, where
                    verify(n)   one target forward of n tokens (the root and N nodes)
                    draft cost  one draft forward of one row (the commit that yields the root's
                                scores) + one forward per expanded level, of as many rows as the
                                level expands: sum of draft(width)
                    overhead    the loop's own seconds per step (verification, emitting, ...) and
                                per draft node (tree building)
Candidates, by kind (``kinds``):
  chain     k = 1..max_depth
  static    Sequoia's DP optimum for every (nodes, depth) with nodes <= max_nodes - 1 and
            depth <= max_depth: Sequoia's hardware-aware (budget, depth) choice is ``kinds=static``
  dynamic   EAGLE-2's tree with ``top_k``, depth 1..max_depth - 1 and ``total_tokens`` in
            ``dynamic_totals`` (MSD's ``total_token=-1`` start-up choice among 40/48/50/56/60,
            i.e. 39/47/49/55/59 draft nodes, is ``kinds=dynamic``). Its accepted length is
            estimated by the static optimum of the same size and depth + 1 levels (what a
            data-independent shape of that size achieves under the model); it drafts
            ``top_k`` rows per level.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .growmap import TreeShape
from .sequoia_dp import _breadth_first, _subtree, _tables, shape_value

KINDS = ("chain", "static", "dynamic")
MSD_TOTALS = (39, 47, 49, 55, 59)  # MSD's total_token 40/48/50/56/60 count the root


@dataclass(frozen=True)
class CostCurve:
    """Seconds of one forward of n rows, measured at ``sizes``; linear in between, and beyond
    the last size along the last segment's slope (flat below the first)."""

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.seconds):
            raise ValueError(f"cost curve needs one time per size, got {self.sizes} and "
                             f"{self.seconds}")
        if list(self.sizes) != sorted(set(self.sizes)) or self.sizes[0] < 1:
            raise ValueError(f"cost curve sizes must be increasing and >= 1, got {self.sizes}")
        if min(self.seconds) < 0:
            raise ValueError(f"cost curve times must be >= 0, got {self.seconds}")

    @staticmethod
    def of(measured: dict[int, float]) -> CostCurve:
        sizes = sorted(measured)
        return CostCurve(tuple(sizes), tuple(float(measured[n]) for n in sizes))

    def __call__(self, n: int) -> float:
        s, t = self.sizes, self.seconds
        if n <= s[-1] or len(s) == 1:
            return float(np.interp(n, s, t))
        slope = (t[-1] - t[-2]) / (s[-1] - s[-2])
        return t[-1] + slope * (n - s[-1])

    def scaled(self, seconds_at_1: float) -> CostCurve:
        """The same shape through ``seconds_at_1`` at n = 1 (e.g. a draft whose only measured
        point is one row, assumed to grow with n as the target does)."""
        ratio = seconds_at_1 / self(1) if self(1) > 0 else 0.0
        return CostCurve(self.sizes, tuple(ratio * t for t in self.seconds))


@dataclass(frozen=True)
class StepCosts:
    """verify: the target forward of n tokens; draft: one draft forward of n rows; overhead:
    seconds per step beyond both, and ``per_node`` more for each draft node."""

    verify: CostCurve
    draft: CostCurve
    overhead: float = 0.0
    per_node: float = 0.0


@dataclass(frozen=True)
class SearchSpace:
    kinds: tuple[str, ...] = KINDS
    max_nodes: int = 64          # verified tokens, the root included
    max_depth: int = 12
    top_k: int = 10              # dynamic trees
    dynamic_totals: tuple[int, ...] = (9, 17, 25, 33, 40, 48, 56, 60)  # the root counted
    dynamic_depth: int = 0       # 0: every depth 1..max_depth - 1

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"auto tree: unknown kinds {bad}; choose from {KINDS}")
        if self.max_nodes < 2 or self.max_depth < 1 or self.top_k < 1:
            raise ValueError(f"auto tree: need max_nodes >= 2, max_depth >= 1, top_k >= 1, got "
                             f"{self.max_nodes}, {self.max_depth}, {self.top_k}")


@dataclass(frozen=True)
class TreePlan:
    """One candidate with its predicted rates; ``params`` rebuild it with ``make_builder``."""

    kind: str
    params: dict[str, str]
    nodes: int
    depth: int
    expected_accept: float
    step_seconds: float
    level_rows: tuple[int, ...] = field(default=(), repr=False)

    @property
    def tokens_per_step(self) -> float:
        return 1.0 + self.expected_accept

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.step_seconds if self.step_seconds > 0 else float("inf")

    @property
    def spec(self) -> str:
        """``kind:key=value;...`` (as ``bench.methods`` names trees)."""
        return self.kind + ":" + ";".join(f"{k}={v}" for k, v in self.params.items())

    def to_dict(self) -> dict:
        return {"tree": self.spec, "kind": self.kind, "nodes": self.nodes, "depth": self.depth,
                "expected_tau": self.tokens_per_step, "step_ms": 1e3 * self.step_seconds,
                "expected_tokens_per_s": self.tokens_per_second}


def level_rows(shape: TreeShape) -> tuple[int, ...]:
    """Rows of each draft forward a level-by-level builder runs for ``shape``: 1 (the root's
    scores), then, per depth, the nodes at that depth that have children."""
    has_kids = {p for p in shape.parents if p >= 0}
    per_depth: dict[int, int] = {}
    for i, d in enumerate(shape.depths):
        if i in has_kids:
            per_depth[d] = per_depth.get(d, 0) + 1
    return (1, *(per_depth[d] for d in sorted(per_depth)))


def step_seconds(nodes: int, rows: Sequence[int], costs: StepCosts) -> float:
    return (costs.verify(nodes + 1) + sum(costs.draft(r) for r in rows) + costs.overhead
            + costs.per_node * nodes)


def candidates(acceptance: Sequence[float], costs: StepCosts, space: SearchSpace) -> list[TreePlan]:
    """Every candidate of ``space`` with its predicted cost and accepted length."""
    # 4 decimals rounded down, as written into the plan's params (still summing to <= 1)
    acc = tuple(math.floor(float(a) * 1e4) / 1e4 for a in acceptance)
    budget = space.max_nodes - 1
    out: list[TreePlan] = []
    if "chain" in space.kinds:
        for k in range(1, min(space.max_depth, budget) + 1):
            shape = TreeShape.chain(k)
            rows = level_rows(shape)
            out.append(TreePlan("chain", {"k": str(k)}, k, k, shape_value(shape, acc),
                                step_seconds(k, rows, costs), rows))
    value = None
    if "static" in space.kinds or "dynamic" in space.kinds:
        levels = max(space.max_depth, space.dynamic_depth + 1) + 1
        value, best_b, best_y = _tables(np.asarray(acc), budget + 1, levels)
    if "static" in space.kinds:
        for depth in range(1, space.max_depth + 1):
            for m in range(1, budget + 1):
                v = value[depth + 1, m + 1]
                if not np.isfinite(v):
                    continue
                shape = TreeShape(tuple(_breadth_first(_subtree(depth + 1, m + 1, best_b, best_y))))
                if max(shape.depths) < depth:  # the same tree is listed at its own depth
                    continue
                rows = level_rows(shape)
                params = {"acceptance": ";".join(f"{a:.4f}" for a in acc),
                          "budget": str(m), "depth": str(depth)}
                out.append(TreePlan("static", params, m, depth, float(v - 1.0),
                                    step_seconds(m, rows, costs), rows))
    if "dynamic" in space.kinds:
        depths = [space.dynamic_depth] if space.dynamic_depth else range(1, space.max_depth)
        for depth in depths:
            for total in space.dynamic_totals:  # MSD's total_tokens: the root counted
                drafted = total - 1
                if not 1 <= drafted <= budget:
                    continue
                v = (float(value[depth + 2, drafted + 1]) if drafted + 1 < value.shape[1]
                     else -np.inf)
                if not np.isfinite(v):
                    continue
                rows = (1, *([space.top_k] * depth))
                params = {"depth": str(depth), "top_k": str(space.top_k),
                          "total_tokens": str(total)}
                out.append(TreePlan("dynamic", params, drafted, depth + 1, v - 1.0,
                                    step_seconds(drafted, rows, costs), rows))
    return out


def plan_tree(acceptance: Sequence[float], costs: StepCosts,
              space: SearchSpace = SearchSpace()) -> TreePlan:
    """The candidate with the most expected tokens per second (ties: the smaller tree, then
    the order of ``KINDS``)."""
    acc = np.asarray(list(acceptance), dtype=np.float64)
    if acc.ndim != 1 or len(acc) == 0 or (acc < 0).any() or acc.sum() > 1 + 1e-6:
        raise ValueError(f"acceptance must be a non-empty vector of probabilities summing to "
                         f"at most 1, got {list(acceptance)}")
    found = candidates(acc, costs, space)
    if not found:
        raise ValueError(f"auto tree: no candidate in {space}")
    return max(found, key=lambda p: (round(p.tokens_per_second, 9), -p.nodes))


@dataclass(frozen=True)
class AutoConfig:
    """``tree=auto`` settings (``tree.<key>=``); lists are ``;``-separated.

    kinds:          the kinds to choose among (``chain;static;dynamic``)
    max_nodes:      most tokens one verify forward may hold, the root included
    max_depth:      deepest draft node
    top_k:          children per expanded node of a dynamic tree
    dynamic_depth:  a fixed dynamic-tree depth (0: choose it)
    dynamic_totals: the dynamic-tree sizes to choose among, as MSD's total_tokens (the root
                    counted: n drafts n - 1 nodes)
    acceptance:     a given rank-acceptance vector instead of the probe's measurement
    probe_width:    children per node on the probe tree's spine (ranks measured)
    """

    kinds: str = ";".join(KINDS)
    max_nodes: int = 64
    max_depth: int = 12
    top_k: int = 10
    dynamic_depth: int = 0
    dynamic_totals: str = "9;17;25;33;40;48;56;60"
    acceptance: str = ""
    probe_width: int = 4

    def __post_init__(self) -> None:
        self.space()  # fails early on bad kinds or sizes
        if self.probe_width < 1 or self.dynamic_depth < 0:
            raise ValueError(f"auto tree: probe_width must be >= 1 and dynamic_depth >= 0, got "
                             f"{self.probe_width}, {self.dynamic_depth}")

    def space(self) -> SearchSpace:
        totals = tuple(int(t) for t in self.dynamic_totals.replace(",", ";").split(";") if t)
        return SearchSpace(tuple(k for k in self.kinds.replace(",", ";").split(";") if k),
                           self.max_nodes, self.max_depth, self.top_k, totals,
                           self.dynamic_depth)


def probe_shape(width: int, depth: int) -> TreeShape:
    """The probe tree: a spine of rank-0 nodes ``depth`` deep, each slot on it with ``width``
    ranked children, so every step measures which rank (if any) the target accepts at each
    spine slot it reaches."""
    parents: list[int] = []
    spine = -1
    for _ in range(depth):
        first = len(parents)
        parents += [spine] * width
        spine = first
    return TreeShape(tuple(parents))

"""Sequoia's dynamic programme: the best fixed tree shape for a measured acceptance vector.

Model (Sequoia's positional acceptance assumption): once a node is accepted, its child of rank r
(0 = the draft's best or first-sampled token) is the one accepted next with probability
``acceptance[r]``, whatever the context; the ranks are exclusive events, so sum(acceptance) <= 1.
A draft node is then accepted with the product of ``acceptance[rank]`` along its path, and the
expected number of accepted draft tokens of a shape is the sum of these products over its nodes.

Recurrence (over subtrees with at most ``l`` levels, root included, and ``m`` nodes):
    value(l, m) = 1 + max over b of kids(l, b, m - 1)          (the 1 counts the subtree's root)
    kids(l, b, k) = max over y of kids(l, b - 1, k - y) + acceptance[b - 1] * value(l - 1, y)
the best way to hang b ranked child subtrees with k nodes in all. Sequoia's ``tree_search.py``
runs the same search; it counts the root, we report accepted draft tokens (one less).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .growmap import TreeShape, to_growmap

NEG = -np.inf


@dataclass(frozen=True)
class SequoiaPlan:
    """shape: the chosen tree; expected_accept: its expected number of accepted draft tokens
    under the acceptance vector (the target's tokens per step is one more)."""

    shape: TreeShape
    expected_accept: float

    @property
    def growmap(self) -> dict[str, Any]:
        """The shape in Sequoia's growmap format (``growmap.py``)."""
        return to_growmap(self.shape)


def shape_value(shape: TreeShape, acceptance: Sequence[float]) -> float:
    """Expected accepted draft tokens of ``shape``: the sum over nodes of the product of
    ``acceptance[rank]`` along the path (0 for ranks beyond the vector)."""
    acc = list(acceptance)
    path: list[float] = []
    for p, r in zip(shape.parents, shape.ranks):
        a = acc[r] if r < len(acc) else 0.0
        path.append(a * (path[p] if p >= 0 else 1.0))
    return float(sum(path))


def sequoia_plan(acceptance: Sequence[float], budget: int, max_depth: int) -> SequoiaPlan:
    """The shape with at most ``budget`` draft nodes and depth ``max_depth`` that maximises the
    expected accepted length; among equally good shapes, the smallest one.

    acceptance: acceptance[r] = probability that the rank-r child is the one accepted.
    """
    acc = np.asarray(list(acceptance), dtype=np.float64)
    if acc.ndim != 1 or len(acc) == 0 or (acc < 0).any() or acc.sum() > 1 + 1e-6:
        raise ValueError(f"acceptance must be a non-empty vector of probabilities summing to "
                         f"at most 1, got {list(acceptance)}")
    if budget < 1 or max_depth < 1:
        raise ValueError(f"budget and max_depth must be >= 1, got {budget}, {max_depth}")
    value, best_b, best_y = _tables(acc, budget + 1, max_depth + 1)
    top = value[max_depth + 1]
    m = int(np.flatnonzero(top >= top.max() - 1e-9)[0])  # smallest optimal size
    parents = _breadth_first(_subtree(max_depth + 1, m, best_b, best_y))
    return SequoiaPlan(TreeShape(tuple(parents)), float(top[m] - 1.0))


def _tables(acc: np.ndarray, m_max: int, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """value[l, m]; best_b[l, m] (children of the root); best_y[l, b, k] (size of child b's
    subtree when b children share k nodes)."""
    B = len(acc)
    value = np.full((levels + 1, m_max + 1), NEG)
    value[1:, 1] = 1.0
    best_b = np.zeros((levels + 1, m_max + 1), dtype=np.int64)
    best_y = np.zeros((levels + 1, B + 1, m_max + 1), dtype=np.int64)
    k = np.arange(m_max + 1)
    y = np.arange(m_max + 1)
    valid = (y[None, :] >= 1) & (y[None, :] <= k[:, None])  # [k, y]
    rest = np.clip(k[:, None] - y[None, :], 0, None)  # [k, y]: nodes left for children < b
    for l in range(2, levels + 1):
        kids = np.full((B + 1, m_max + 1), NEG)
        kids[0, 0] = 0.0
        for b in range(1, B + 1):
            with np.errstate(invalid="ignore"):
                cand = kids[b - 1][rest] + acc[b - 1] * value[l - 1][None, :]  # [k, y]
            cand = np.where(valid & np.isfinite(cand), cand, NEG)
            best_y[l, b] = cand.argmax(axis=1)
            kids[b] = cand.max(axis=1)
        best_b[l, 1:] = kids[:, :m_max].argmax(axis=0)  # root of m nodes: kids share m - 1
        value[l, 1:] = 1.0 + kids[:, :m_max].max(axis=0)
    return value, best_b, best_y


def _subtree(l: int, m: int, best_b: np.ndarray, best_y: np.ndarray) -> list:
    """The optimal subtree of m nodes within l levels, as nested lists of ranked children."""
    b, k = int(best_b[l, m]), m - 1
    sizes: list[int] = []
    for rank in range(b, 0, -1):
        y = int(best_y[l, rank, k])
        sizes.append(y)
        k -= y
    return [_subtree(l - 1, y, best_b, best_y) for y in reversed(sizes)]


def _breadth_first(root: list) -> list[int]:
    parents: list[int] = []
    level = [(-1, root)]
    while level:
        nxt = []
        for node, kids in level:
            for sub in kids:
                nxt.append((len(parents), sub))
                parents.append(node)
        level = nxt
    return parents


def load_acceptance(spec: str) -> tuple[float, ...]:
    """An acceptance vector from "p0,p1,..." (or "p0;p1;...": lmms-eval splits model_args on
    commas) or from a Sequoia ``.pt`` file, which holds [0, p_1, ..., p_w, p_none]
    (``tests/test_accept.py``: a pad, the rank frequencies, the frequency of no acceptance)."""
    if spec.endswith(".pt"):
        vec = torch.load(spec, map_location="cpu", weights_only=True)
        out = tuple(float(x) for x in torch.as_tensor(vec).flatten()[1:-1])
    else:
        try:
            out = tuple(float(x) for x in spec.replace(";", ",").split(","))
        except ValueError:
            raise ValueError(f"acceptance {spec!r} is neither a .pt file nor floats separated "
                             "by ',' or ';'") from None
    if not out or min(out) < 0 or sum(out) > 1 + 1e-6:
        raise ValueError(f"acceptance {spec!r}: need probabilities summing to at most 1")
    return out

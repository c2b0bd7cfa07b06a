"""Fixed tree shapes, and Sequoia's "growmap" file format for them.

A growmap (Infini-AI-Lab/Sequoia, written by ``tree_search.py``, read by ``Tree/SpecTree.py``)
is a ``torch.save``d dict over the nodes of a tree *including the root* (node 0), numbered
breadth first: the children of a node get consecutive numbers and every level is contiguous.
  roots       list[list[int]]: roots[l] = every node at depth l, leaves included, in order;
              Sequoia grows the tree by expanding roots[0], roots[1], ... one level per step
  branches    list[list[int]]: branches[l][j] = number of children of roots[l][j]
  Successors  list[list[int]]: Successors[i] = the children of node i, in rank order (the first
              child is the draft's best, or first-sampled, token)
  mask        # [size, size] long: mask[i, j] = 1 where j is i or an ancestor of i
  depth       # [size] long: 0 for the root
  size        int: number of nodes, the root included
The last level of ``roots`` lists leaves only (all its branches are 0).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

GROWMAP_KEYS = ("roots", "branches", "Successors", "mask", "depth", "size")


@dataclass(frozen=True)
class TreeShape:
    """The shape of a draft tree, without tokens.

    parents[i] is the parent of draft node i (-1 = the root). Nodes are numbered breadth first,
    which is the same as: parents[i] < i and parents never decrease. Siblings are therefore
    consecutive, and their order is their rank (the i-th child takes the i-th best token).
    """

    parents: tuple[int, ...]

    def __post_init__(self) -> None:
        prev = -1
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"tree shape: parent {p} of node {i} must be in [-1, {i})")
            if p < prev:
                raise ValueError(f"tree shape: node {i} has parent {p} after a node with parent "
                                 f"{prev}; nodes must be numbered breadth first")
            prev = p

    @staticmethod
    def chain(k: int) -> TreeShape:
        """k nodes in a line."""
        return TreeShape(tuple(range(-1, k - 1)))

    @staticmethod
    def from_widths(widths: Sequence[int]) -> TreeShape:
        """Every node at depth d (0 = the root) gets ``widths[d]`` children; e.g. (4, 1, 1, 1) is
        Sequoia's "4x4-tree": four chains of four tokens."""
        parents: list[int] = []
        level = [-1]
        for w in widths:
            nxt: list[int] = []
            for p in level:
                nxt += range(len(parents), len(parents) + w)
                parents += [p] * w
            level = nxt
        return TreeShape(tuple(parents))

    @property
    def size(self) -> int:
        return len(self.parents)

    @cached_property
    def depths(self) -> tuple[int, ...]:
        """Depth of each node, 1 for the root's children."""
        d: list[int] = []
        for p in self.parents:
            d.append(1 if p < 0 else d[p] + 1)
        return tuple(d)

    @property
    def depth(self) -> int:
        return max(self.depths, default=0)

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """children[s] = the nodes whose parent is slot s (slot 0 = the root, s = node + 1)."""
        ch: list[list[int]] = [[] for _ in range(self.size + 1)]
        for i, p in enumerate(self.parents):
            ch[p + 1].append(i)
        return tuple(tuple(c) for c in ch)

    @cached_property
    def ranks(self) -> tuple[int, ...]:
        """Rank of each node among its siblings, 0 for the first child."""
        r = [0] * self.size
        for kids in self.children:
            for j, c in enumerate(kids):
                r[c] = j
        return tuple(r)


def to_growmap(shape: TreeShape) -> dict[str, Any]:
    """The Sequoia growmap of a shape (node i of the shape is growmap node i + 1)."""
    size = shape.size + 1
    parents = [-1] + [p + 1 for p in shape.parents]
    depth = [0] + list(shape.depths)
    successors = [[c + 1 for c in kids] for kids in shape.children]
    mask = torch.zeros(size, size, dtype=torch.long)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = 1
    roots = [[i for i in range(size) if depth[i] == d] for d in range(shape.depth + 1)]
    branches = [[len(successors[i]) for i in level] for level in roots]
    return {"roots": roots, "branches": branches, "Successors": successors, "mask": mask,
            "depth": torch.tensor(depth, dtype=torch.long), "size": size}


def from_growmap(growmap: dict[str, Any]) -> TreeShape:
    """Read a Sequoia growmap; every key must agree with the tree that ``Successors`` describes."""
    missing = [k for k in GROWMAP_KEYS if k not in growmap]
    if missing:
        raise ValueError(f"growmap lacks keys {missing}; it needs {list(GROWMAP_KEYS)}")
    successors = [[int(c) for c in kids] for kids in growmap["Successors"]]
    size = int(growmap["size"])
    if len(successors) != size:
        raise ValueError(f"growmap: size {size} but {len(successors)} Successors lists")
    parents = [-2] * size
    for i, kids in enumerate(successors):
        for c in kids:
            if not 0 < c < size or parents[c] != -2:
                raise ValueError(f"growmap: node {c} (a successor of {i}) is out of range or "
                                 "has two parents")
            parents[c] = i
    if any(p == -2 for p in parents[1:]):
        raise ValueError("growmap: some node other than the root has no parent")
    shape = TreeShape(tuple(p - 1 for p in parents[1:]))
    if [list(kids) for kids in successors] != [[c + 1 for c in k] for k in shape.children]:
        raise ValueError("growmap: Successors are not numbered breadth first in rank order")
    _check_agrees(growmap, to_growmap(shape))
    return shape


def _check_agrees(got: dict[str, Any], want: dict[str, Any]) -> None:
    for key in ("roots", "branches"):
        if [list(map(int, x)) for x in got[key]] != want[key]:
            raise ValueError(f"growmap: {key!r} disagrees with Successors")
    for key in ("mask", "depth"):
        if not torch.equal(torch.as_tensor(got[key]).long().cpu(), want[key]):
            raise ValueError(f"growmap: {key!r} disagrees with Successors")


def save_growmap(shape: TreeShape, path: str | Path) -> None:
    torch.save(to_growmap(shape), path)


def load_growmap(path: str | Path) -> TreeShape:
    """A growmap file, local or ``ORG/NAME/FILE`` on the hub."""
    from ..adapters.hub import resolve_file
    return from_growmap(torch.load(resolve_file(path), map_location="cpu", weights_only=True))

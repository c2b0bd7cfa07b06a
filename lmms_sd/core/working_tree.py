"""A drafter's working tree within one step: which expanded nodes each new node may attend to.

Drafters with a KV cache append expanded nodes after the committed prefix, in expansion order.
A node sees the committed prefix, its ancestors and itself; its depth (1 for the root's
children) gives its position after the root.
"""
from __future__ import annotations

import torch
from torch import Tensor


class WorkingTree:
    def __init__(self) -> None:
        self.ancestors: list[list[int]] = []  # per expanded node: its ancestors and itself
        self.depths: list[int] = []

    def __len__(self) -> int:
        return len(self.depths)

    def reset(self) -> None:
        self.ancestors, self.depths = [], []

    def extends_chain(self, parents: Tensor) -> bool:
        """True when adding ``parents`` # [m] keeps the tree one chain hanging from the root, so
        plain causal attention is exact."""
        n = len(self)
        return len(parents) == 1 and int(parents[0]) == n - 1 and (n == 0 or self.depths[-1] == n)

    def add(self, parents: Tensor) -> Tensor:
        """Append nodes with ``parents`` # [m] (-1 = the root); return their depths # [m]."""
        n0 = len(self)
        for i, p in enumerate(parents.tolist()):
            self.ancestors.append((self.ancestors[p] if p >= 0 else []) + [n0 + i])
            self.depths.append(self.depths[p] + 1 if p >= 0 else 1)
        return torch.tensor(self.depths[n0:], dtype=torch.long)

    def mask(self, committed: int, m: int, device: torch.device) -> Tensor:
        """# [m, committed + len(self)] bool: the attention of the last ``m`` added nodes."""
        n = len(self)
        out = torch.zeros(m, committed + n, dtype=torch.bool)
        out[:, :committed] = True
        for i in range(m):
            out[i, [committed + a for a in self.ancestors[n - m + i]]] = True
        return out.to(device)

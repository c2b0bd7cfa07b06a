"""What every tree builder is: a function of a drafter's scores that returns a ``DraftTree``."""
from __future__ import annotations

from typing import Protocol

import torch

from ..core.interfaces import Drafter
from ..core.sampling import SamplingConfig
from ..core.tree import DraftTree


class TreeBuilder(Protocol):
    """Calls ``drafter.root()`` once and ``drafter.expand`` as it likes, returns the tree.

    In greedy mode (``sampling.greedy``) children are chosen deterministically; in sampling mode
    a builder either samples children from the processed draft distribution (``sampled=True``,
    with ``draft_probs``) or chooses them deterministically (``sampled=False``); verification
    is lossless either way.
    """

    def __call__(self, drafter: Drafter, sampling: SamplingConfig,
                 generator: torch.Generator | None = None) -> DraftTree: ...

"""The drafters' working tree: masks, depths and the chain fast path on a hand-built tree."""
from __future__ import annotations

import torch

from lmms_sd.core.working_tree import WorkingTree


def test_masks_depths_and_chain_detection():
    t = WorkingTree()
    assert t.extends_chain(torch.tensor([-1]))
    assert t.add(torch.tensor([-1])).tolist() == [1]          # node 0 under the root
    assert t.extends_chain(torch.tensor([0]))
    assert t.add(torch.tensor([0, 0])).tolist() == [2, 2]     # nodes 1, 2: siblings
    assert not t.extends_chain(torch.tensor([2]))             # node 2 would see sibling 1
    assert t.add(torch.tensor([2])).tolist() == [3]           # node 3 under node 2
    mask = t.mask(committed=2, m=1, device=torch.device("cpu"))
    # committed prefix, then node 0, node 2 and itself (node 3); not sibling node 1
    assert mask.int().tolist() == [[1, 1, 1, 0, 1, 1]]
    both = t.mask(committed=2, m=2, device=torch.device("cpu"))  # the last two: nodes 2, 3
    assert both[0].int().tolist() == [1, 1, 1, 0, 1, 0]
    t.reset()
    assert len(t) == 0 and t.extends_chain(torch.tensor([-1]))

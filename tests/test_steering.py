"""The thesis's steering of the Calibrated OPT-Tree (``calibration/steering.py``) on hand-made
numbers: the adaptive alpha, the re-normalised biased softmax, the score, and the defaults."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmms_sd.calibration.online import CalibratedSettings
from lmms_sd.calibration.steering import ThesisScore, adaptive_alpha, biased_child_probs
from lmms_sd.core.sampling import SamplingConfig
from lmms_sd.trees.opt import ChildCandidates


def test_thesis_is_the_default_with_its_tree_and_soft_labels():
    s = CalibratedSettings()
    assert (s.steering, s.nodes, s.top_k, s.threshold, s.max_depth) == ("thesis", 500, 10, 0.2, 10)
    assert s.plain_threshold == 0.2 and s.alpha == 1.0
    assert s.label_for(SamplingConfig()) == "soft"  # soft labels even under greedy decoding
    r = CalibratedSettings("replace")
    assert (r.nodes, r.top_k, r.plain_threshold, r.label_for(SamplingConfig())) == \
        (60, None, 0.5, "hard")
    assert CalibratedSettings(nodes=20).opt_steered.width == 10
    with pytest.raises(ValueError, match="steering"):
        CalibratedSettings("bias")


def test_adaptive_alpha_by_hand():
    # equal margins and attentions: both factors 1; depth 3 -> 0.5: 0.2 + 0.2 + 0.4 = 0.8
    flat = np.full(4, 0.3)
    assert adaptive_alpha(flat, 3, flat, np.zeros(4, bool)) == pytest.approx([0.8] * 4)
    # depth 1: 0.2 + 0.4/6 + 0.4 = 0.6667; a number token: x1.4 = 0.9333, clipped to 0.8
    got = adaptive_alpha(flat, 1, flat, np.array([False, True, False, False]), base_alpha=0.5)
    assert got == pytest.approx([0.5 * 0.6667, 0.5 * 0.8, 0.5 * 0.6667, 0.5 * 0.6667], abs=1e-4)
    # a sure, image-looking candidate (top margin and attention) at depth 1: 0.4/6 -> floor 0.2;
    # an unsure, image-blind one: 0.2 + 0.4/6 + 0.4 = 0.6667
    margin, attention = np.array([0.0] * 10 + [1.0]), np.array([0.0] * 10 + [1.0])
    got = adaptive_alpha(margin, 1, attention, np.zeros(11, bool))
    assert got[-1] == pytest.approx(0.2) and got[0] == pytest.approx(0.6667, abs=1e-4)


def test_biased_child_probs_is_the_softmax_of_the_biased_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 12, generator=g, dtype=torch.float64) * 2
    probs, tokens = torch.softmax(logits, -1).topk(4, dim=-1)
    bias = torch.randn(3, 4, generator=g, dtype=torch.float64)
    expected = torch.softmax(logits.scatter_add(-1, tokens, bias), -1).gather(-1, tokens)
    assert torch.allclose(biased_child_probs(probs, bias), expected, atol=1e-12)


class _Calibrator:
    def __init__(self, p_hat: torch.Tensor) -> None:
        self.p_hat = p_hat

    def predict_children(self, probs, tokens, dists, depth, categories, attention):
        return self.p_hat


class _Drafter:
    def attention(self, expanded: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(expanded))


def test_thesis_score_biases_the_preselected_logits():
    # the root's layer: one parent (equal margin, no attention), depth 1, content tokens only:
    # alpha = 0.6667 everywhere; p_hat 0.9999 clips to logit +3, 1e-5 to the 1e-3 floor -> -3
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 10, generator=g)
    dists = torch.softmax(logits, -1)
    probs, tokens = dists.topk(3, dim=-1)
    p_hat = torch.tensor([[0.5, 0.9999, 1e-5]])
    score = ThesisScore(_Calibrator(p_hat), np.zeros(10, np.int8), _Drafter())
    got = score(ChildCandidates(probs, tokens, dists, 1, torch.tensor([-1])))
    bias = (0.2 + 0.4 / 6 + 0.4) * torch.tensor([[0.0, 3.0, -3.0]])
    expected = torch.softmax(logits.scatter_add(-1, tokens, bias), -1).gather(-1, tokens)
    assert torch.allclose(got, expected, atol=1e-6)
    assert got[0, 1] > probs[0, 1] and got[0, 2] < probs[0, 2]

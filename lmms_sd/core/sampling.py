"""Turning logits into the distribution that decoding samples from.

The same transform is applied to target and draft logits: speculative sampling is lossless with
respect to the *processed* target distribution, so both sides must see identical processing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1 disable those filters; top_p 0
    keeps only the most likely token (as transformers, which always keeps one)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def logits_to_probs(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """# [..., V] logits -> [..., V] float32 probabilities after temperature, top-k, top-p.

    For greedy configs this is the plain softmax (used only for scoring draft trees).
    """
    x = logits.float()
    if cfg.greedy:
        return torch.softmax(x, dim=-1)
    x = x / cfg.temperature
    if cfg.top_k > 0 and cfg.top_k < x.shape[-1]:
        kth = torch.topk(x, cfg.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= cfg.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: Tensor, generator: torch.Generator | None = None) -> int:
    """Draw one token id from a # [V] distribution (on the generator's device, so a CPU
    generator can drive sampling from GPU tensors)."""
    if generator is not None:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


def residual(p: Tensor, q: Tensor) -> Tensor:
    """normalize(relu(p - q)), the distribution to sample from after rejecting a draw of q.

    When p <= q everywhere (possible only through rounding) fall back to p itself.
    """
    r = torch.clamp(p - q, min=0.0)
    s = r.sum()
    return r / s if s > 0 else p

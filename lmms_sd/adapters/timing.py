"""Measuring what forwards cost: per-call timers and the target's cost of an n-token forward.

``Timer`` / ``TimedProxy`` charge wall seconds to named parts (the device is synchronised
around each timed call, so GPU work lands on the call that launched it). ``forward_costs``
times ``n``-token forwards at the adapter's current context and crops the cache back after each,
so the caller's cache is unchanged.
"""
from __future__ import annotations

import functools
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core.interfaces import ModelAdapter

COST_SIZES = (1, 2, 4, 8, 16, 32, 64)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Seconds (of ``clock``: wall by default, ``time.thread_time`` for CPU time) and call counts
    per named part; ``timed`` wraps a callable. ``rows`` keeps, per part, (rows of the first
    tensor argument, seconds) of each call."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter):
        self.device, self.clock = device, clock
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.rows: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def timed(self, part: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            t0 = self.clock()
            out = fn(*args, **kwargs)
            sync(self.device)
            elapsed = self.clock() - t0
            self.seconds[part] += elapsed
            self.calls[part] += 1
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            self.rows[part].append((len(first) if first is not None else 1, elapsed))
            return out
        return wrapper


class TimedProxy:
    """``inner`` with the methods named in ``parts`` (method -> part) timed; all else delegated.
    Calls the inner object makes on itself (e.g. ``prefill`` running the model) are not seen."""

    def __init__(self, inner: Any, timer: Timer, parts: dict[str, str]):
        self._inner, self._timer, self._parts = inner, timer, parts

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        part = self._parts.get(name)
        return attr if part is None else self._timer.timed(part, attr)


def forward_costs(model: ModelAdapter, token: int, sizes: Sequence[int] = COST_SIZES,
                  repeats: int = 5, warmup: int = 2) -> dict[int, float]:
    """Median seconds of one causal forward of ``n`` copies of ``token`` for each n in
    ``sizes``, at the model's current cache length (left unchanged). Sizes are interleaved
    within each round so that drift hits all of them alike."""
    if model.seq_len < 1:
        raise ValueError("forward_costs times forwards after a prefill: prefill a prompt first")
    device = getattr(model, "device", torch.device("cpu"))
    base = model.seq_len
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    for r in range(warmup + repeats):
        for n in sizes:
            tokens = torch.full((n,), token, dtype=torch.long, device=device)
            sync(device)
            t0 = time.perf_counter()
            model.forward(tokens)
            sync(device)
            elapsed = time.perf_counter() - t0
            model.crop(base)
            if r >= warmup:
                samples[n].append(elapsed)
    return {n: statistics.median(v) for n, v in samples.items()}

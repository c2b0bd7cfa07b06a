"""The decoding loop's cost beyond the target forward, in thread CPU time (for busy machines).

    python -m lmms_sd.bench.overhead --target PATH [--k 2 4 6] [--alphas 1 0.8] [--rounds 5]

On a shared machine, wall time mostly measures the wait for a core. With one torch thread, the
thread's CPU time (``time.thread_time``) counts only the work done, so the loop's own overhead
can be compared before and after a change even when the machine is busy. The drafter is the
oracle (``oracle.py``: free, right with probability alpha), the tree a chain of k.

Per setting, medians over ``--rounds`` passes (settings interleaved in each):
  forward ms/step   CPU in the target's decode forwards per step
  loop ms/step      CPU of the whole decode per step (prefill excluded)
  overhead ms/step  loop - forward: drafting, tree building, verification, cache edits, the rest
  efficiency        (forward share of the loop) / (forward share of the autoregressive loop):
                    achieved / ideal speedup with ideal = tokens per forward x t1 / t_verify,
                    t1 and t_verify taken from the forwards of the loops themselves
and a profiled pass splits the overhead per step as ``efficiency.py`` does (cache edits, mask
building, verification, drafter, tree building, the rest), in CPU time too.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..adapters.timing import Timer, TimedProxy
from ..core.generate import GenerationConfig, generate
from ..trees import make_builder
from .efficiency import DRAFTER_PARTS, PARTS, TARGET_PARTS, breakdown, timed_loop_functions
from .oracle import OracleDrafter


class _CPUTimedTarget:
    """The target with the CPU seconds of ``prefill`` and ``forward`` summed."""

    def __init__(self, inner: Any):
        self._inner, self.prefill_s, self.forward_s = inner, 0.0, 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def prefill(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.thread_time()
        out = self._inner.prefill(*args, **kwargs)
        self.prefill_s += time.thread_time() - t0
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.thread_time()
        out = self._inner.forward(*args, **kwargs)
        self.forward_s += time.thread_time() - t0
        return out


def one_pass(target: Any, prompts: Sequence[Any], refs: list[list[int]], gen: GenerationConfig,
             alpha: float | None, k: int) -> dict[str, float]:
    """CPU seconds of one pass over ``prompts`` (``alpha`` None: autoregressive)."""
    timed = _CPUTimedTarget(target)
    loop_s, steps = 0.0, 0
    for i, prompt in enumerate(prompts):
        drafter = None if alpha is None else OracleDrafter(refs[i], alpha, target.vocab_size, i)
        builder = None if alpha is None else make_builder("chain", k=k)
        t0 = time.thread_time()
        res = generate(timed, prompt, gen, drafter, builder)
        loop_s += time.thread_time() - t0
        steps += res.stats.decode_steps
    decode_s = loop_s - timed.prefill_s
    return {"forward": timed.forward_s / steps, "loop": decode_s / steps}


def profiled_pass(target: Any, prompts: Sequence[Any], refs: list[list[int]],
                  gen: GenerationConfig, alpha: float | None, k: int) -> dict[str, float]:
    """CPU milliseconds per decode step of each part (``efficiency.PARTS``)."""
    timer = Timer(torch.device("cpu"), clock=time.thread_time)
    decode_s, steps = 0.0, 0
    for i, prompt in enumerate(prompts):
        drafter = None if alpha is None else OracleDrafter(refs[i], alpha, target.vocab_size, i)
        builder = None if alpha is None else make_builder("chain", k=k)
        model = TimedProxy(target, timer, {**TARGET_PARTS, "prefill": "prefill"})
        if drafter is not None:
            drafter = TimedProxy(drafter, timer, DRAFTER_PARTS)
            builder = timer.timed("builder", builder)
        prefill0 = timer.seconds["prefill"]
        with timed_loop_functions(timer):
            t0 = time.thread_time()
            res = generate(model, prompt, gen, drafter, builder)
            decode_s += time.thread_time() - t0
        decode_s -= timer.seconds["prefill"] - prefill0
        steps += res.stats.decode_steps
    return breakdown(timer, decode_s, steps)


def measure(target: Any, prompts: Sequence[Any], ks: Sequence[int], alphas: Sequence[float],
            rounds: int, max_new_tokens: int) -> list[dict[str, Any]]:
    gen = GenerationConfig(max_new_tokens=max_new_tokens)  # no EOS: fixed length
    refs = [generate(target, p, gen).tokens for p in prompts]
    settings: list[tuple[float | None, int]] = [(None, 0)] + [(a, k) for a in alphas for k in ks]
    samples: dict[tuple, list[dict]] = {s: [] for s in settings}
    for _ in range(rounds + 1):  # the first round is a warm-up
        for s in settings:
            samples[s].append(one_pass(target, prompts, refs, gen, *s))
    rows = []
    for (alpha, k), runs in samples.items():
        parts = profiled_pass(target, prompts, refs, gen, alpha, k)
        runs = runs[1:]
        fwd = statistics.median(r["forward"] for r in runs)
        loop = statistics.median(r["loop"] for r in runs)
        rows.append({"setting": "ar" if alpha is None else f"oracle a={alpha:g} k={k}",
                     "forward_ms": 1e3 * fwd, "loop_ms": 1e3 * loop,
                     "overhead_ms": 1e3 * (loop - fwd), "share": fwd / loop, "parts_ms": parts})
    for r in rows:
        r["efficiency"] = r["share"] / rows[0]["share"]
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(prog="python -m lmms_sd.bench.overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.8])
    ap.add_argument("--items", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from ..adapters.loading import load_adapter
    from .run import machine, shapes_prompts

    target = load_adapter(args.target)
    rows = measure(target, shapes_prompts(target, args.items), args.k, args.alphas, args.rounds,
                   args.max_new_tokens)
    print(f"{args.target}, {args.items} prompts, {args.max_new_tokens} new tokens, thread CPU "
          f"time, median of {args.rounds}; {machine()}\n")
    print("| setting | forward ms/step | loop ms/step | overhead ms/step | efficiency |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['forward_ms']:.3f} | {r['loop_ms']:.3f} | "
              f"{r['overhead_ms']:.3f} | {r['efficiency']:.3f} |")
    print("\nProfiled pass, CPU ms per step\n")
    print("| setting | " + " | ".join(PARTS) + " |\n|" + "---|" * (len(PARTS) + 1))
    for r in rows:
        print(f"| {r['setting']} | " + " | ".join(f"{r['parts_ms'][p]:.3f}" for p in PARTS) + " |")
    return rows


if __name__ == "__main__":
    main()

"""Engine efficiency: how much of the ideal speedup the decoding loop turns into real speedup.

    python -m lmms_sd.bench.efficiency --target PATH --out DIR [--alphas 1 0.8 0.6] [--k 2 4 6]
    python -m lmms_sd.bench.efficiency --shape llava-7b --out DIR             # on a GPU
    python -m lmms_sd.bench.efficiency --shape llava-7b --layers 2 --out DIR  # CPU smoke run

The drafter is the oracle (``oracle.py``): the target's own continuation, each token right with
probability alpha, proposed in a chain of k at no model cost. For every (alpha, k):

  achieved     decode wall of the autoregressive loop / decode wall of the SD loop, on the same
               prompts and for the same number of new tokens (the prefill is identical in both
               and left out). Medians over ``--repeats``, the settings interleaved.
  tokens/fwd   tokens emitted by decode steps / target decode forwards, counted at the adapter.
               Equals tau up to the last step's cut at the token budget; for a chain of k with
               independent acceptance alpha, expected tau = sum_{i=0..k} alpha^i.
  ideal        tokens/fwd x t1 / t_verify(k+1): the speedup of a loop with no overhead. t1 and
               t_verify(q) are medians of q-token target forwards timed directly on the adapter
               at mid-generation context (prompt + half the reference), after warm-up, the cache
               cropped back after each.
  efficiency   achieved / ideal.

A profiled run of each setting splits the decode time per step into the target forward, cache
edits (keep / crop), mask building, verification, the drafter, tree building (the builder minus
the drafter calls inside it) and the rest: the loop's own Python, tensor building and host-device
syncs. Profiling wraps the adapter and the drafter in timing proxies, swaps timed versions of the
verify and mask functions in for the duration, and synchronises the device around every timed
call, so GPU work is charged to the call that launched it; its wall is reported beside the
unprofiled one. Generation is fixed-length (EOS ignored) so every setting decodes the same tokens.

``--shape llava-7b`` builds a random-weight Llama decoder in the shapes of LLaVA-1.5-7B's language
model (hidden 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32064; fp16 on CUDA) behind the
causal-LM adapter, with random prompts of ``--prompt-len`` tokens (default 600, about LLaVA-1.5's
576 image tokens and a question: in the decode loop an image position costs what a text position
costs). On a CPU it needs ``--layers N`` (a truncated stack, fp32) and only shows that the code
runs: a CPU decode step is compute-bound where a GPU decode step is memory-bound, so t_verify / t1
and every ratio built on it say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapters.base import HFAdapter, extend_prompt
from ..adapters.timing import Timer, TimedProxy
from ..adapters.timing import sync as _sync
from ..core import generate as loop
from ..core.generate import GenerationConfig, generate
from ..core.interfaces import PromptInputs
from ..core.tree import DraftTree
from ..lmms_eval.speed import sample_stats, summarize
from ..trees import make_builder
from .oracle import OracleDrafter


@dataclass(frozen=True)
class EfficiencyConfig:
    alphas: tuple[float, ...] = (1.0, 0.8, 0.6)
    ks: tuple[int, ...] = (2, 4, 6)
    max_new_tokens: int = 64
    repeats: int = 3        # timed passes over the prompts per setting; the median is reported
    step_repeats: int = 30  # timed forwards per size in the step-cost measurement
    warmup: int = 3         # untimed rounds before it

    def __post_init__(self) -> None:
        for a in self.alphas:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], got {a}")
        for k in self.ks:
            if k < 1:
                raise ValueError(f"chain length k must be >= 1, got {k}")
        for name in ("max_new_tokens", "repeats", "step_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


@dataclass(frozen=True)
class Setting:
    """One timed configuration: the autoregressive loop (``alpha`` None) or the oracle chain."""

    alpha: float | None
    k: int = 0

    @property
    def name(self) -> str:
        return "ar" if self.alpha is None else f"oracle a={self.alpha:g} k={self.k}"


AR = Setting(None)


@contextmanager
def timed_loop_functions(timer: Timer) -> Iterator[None]:
    """Swap timed versions in for the verify functions the loop calls and the tree's mask
    methods, restoring the originals on exit."""
    swaps = [(loop, "verify_greedy", "verify"), (loop, "verify_stochastic", "verify"),
             (DraftTree, "attention_mask", "mask"), (DraftTree, "slot_depths", "mask")]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
    for owner, name, part in swaps:
        setattr(owner, name, timer.timed(part, getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def breakdown(timer: Timer, decode_s: float, steps: int) -> dict[str, float]:
    """Milliseconds per decode step of each reported part; ``other`` is what no part explains."""
    s = timer.seconds
    parts = {"target forward": s["forward"], "cache edits": s["keep"] + s["crop"],
             "mask building": s["mask"], "verification": s["verify"],
             "drafter": s["draft_propose"] + s["draft_update"],
             "tree building": s["builder"] - s["draft_propose"]}
    parts["other"] = decode_s - sum(parts.values())
    return {k: 1e3 * v / steps for k, v in parts.items()}


# ---------------------------------------------------------------------------- the measurements

def _drafter(setting: Setting, reference: list[int], vocab_size: int,
             seed: int) -> tuple[OracleDrafter | None, Callable | None]:
    if setting.alpha is None:
        return None, None
    drafter = OracleDrafter(reference, setting.alpha, vocab_size, seed)
    return drafter, make_builder("chain", k=setting.k)


TARGET_PARTS = {"forward": "forward", "keep": "keep", "crop": "crop"}
DRAFTER_PARTS = {"root": "draft_propose", "expand": "draft_propose",
                 "begin": "draft_update", "commit": "draft_update"}


def _profiled(target: HFAdapter, drafter: OracleDrafter | None, builder: Callable | None,
              timer: Timer) -> tuple[Any, Any, Callable | None]:
    """The target, drafter and builder behind timing proxies."""
    if drafter is None:
        return TimedProxy(target, timer, TARGET_PARTS), None, None
    return (TimedProxy(target, timer, TARGET_PARTS), TimedProxy(drafter, timer, DRAFTER_PARTS),
            timer.timed("builder", builder))


def run_setting(target: HFAdapter, prompts: Sequence[PromptInputs], refs: list[list[int]] | None,
                gen: GenerationConfig, setting: Setting,
                timer: Timer | None = None) -> tuple[float, list[dict], list[list[int]]]:
    """Decode every prompt under ``setting``; return (summed decode wall, records, outputs).
    With a ``timer`` the adapter, drafter, builder and loop functions are profiled."""
    decode_s, records, outputs = 0.0, [], []
    for i, prompt in enumerate(prompts):
        model: Any = target
        drafter, builder = _drafter(setting, refs[i] if refs else [], target.vocab_size, i)
        if timer is not None:
            model, drafter, builder = _profiled(target, drafter, builder, timer)
        with timed_loop_functions(timer) if timer is not None else _nothing():
            res = generate(model, prompt, gen, drafter, builder)
        decode_s += res.stats.wall_time - res.stats.prefill_time
        records.append({"stats": sample_stats(res)})
        outputs.append(res.tokens)
    return decode_s, records, outputs


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def step_costs(target: HFAdapter, prompts: Sequence[PromptInputs], refs: list[list[int]],
               sizes: Sequence[int], cfg: EfficiencyConfig) -> dict[int, float]:
    """Median seconds of a ``q``-token target forward for each q in ``sizes``, at the context of
    mid-generation; sizes are interleaved within each round so drift hits all of them alike."""
    samples: dict[int, list[float]] = {q: [] for q in sizes}
    rounds = max(1, math.ceil(cfg.step_repeats / len(prompts)))
    for prompt, ref in zip(prompts, refs):
        target.prefill(extend_prompt(prompt, torch.tensor(ref[: len(ref) // 2], dtype=torch.long)))
        base, token = target.seq_len, int(prompt.input_ids[-1])
        for r in range(cfg.warmup + rounds):
            for q in sizes:
                tokens = torch.full((q,), token, dtype=torch.long, device=target.device)
                _sync(target.device)
                t0 = time.perf_counter()
                target.forward(tokens)
                _sync(target.device)
                elapsed = time.perf_counter() - t0
                target.crop(base)
                if r >= cfg.warmup:
                    samples[q].append(elapsed)
    return {q: statistics.median(v) for q, v in samples.items()}


def expected_tau(alpha: float, k: int) -> float:
    """Tokens per step of a chain of k drafts each accepted with probability alpha."""
    return float(sum(alpha ** i for i in range(k + 1)))


def measure(target: HFAdapter, prompts: Sequence[PromptInputs], cfg: EfficiencyConfig) -> dict:
    """Everything in the module docstring: ``{"step_costs_ms": {q: ms}, "rows": [...]}``."""
    if not prompts:
        raise ValueError("no prompts to measure on")
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens)  # no EOS: fixed length
    _, _, refs = run_setting(target, prompts, None, gen, AR)  # the reference, and a warm-up
    settings = [AR] + [Setting(a, k) for a in cfg.alphas for k in cfg.ks]
    walls: dict[Setting, list[float]] = {s: [] for s in settings}
    runs: dict[Setting, tuple[list[dict], list[list[int]]]] = {}
    for _ in range(cfg.repeats):
        for s in settings:
            wall, records, outputs = run_setting(target, prompts, refs, gen, s)
            walls[s].append(wall)
            runs[s] = (records, outputs)
    costs = step_costs(target, prompts, refs, sorted({1} | {k + 1 for k in cfg.ks}), cfg)
    ar_wall = statistics.median(walls[AR])
    rows = [_row(target, prompts, refs, gen, s, walls[s], ar_wall, *runs[s], costs)
            for s in settings]
    return {"step_costs_ms": {q: 1e3 * t for q, t in costs.items()}, "rows": rows}


def _row(target: HFAdapter, prompts: Sequence[PromptInputs], refs: list[list[int]],
         gen: GenerationConfig, s: Setting, walls: list[float], ar_wall: float,
         records: list[dict], outputs: list[list[int]], costs: dict[int, float]) -> dict:
    timer = Timer(target.device)
    profiled_s, profiled, _ = run_setting(target, prompts, refs, gen, s, timer)
    summary = summarize(records)
    steps = sum(r["stats"]["decode_steps"] for r in records)
    # counted in the profiled run (same seeds, same tokens): the prefill emits the first token
    decode_tokens = sum(r["stats"]["new_tokens"] - 1 for r in profiled)
    tokens_per_forward = decode_tokens / timer.calls["forward"]
    wall = statistics.median(walls)
    ideal = tokens_per_forward * costs[1] / costs[s.k + 1] if s.alpha is not None else 1.0
    achieved = ar_wall / wall
    return {"setting": s.name, "alpha": s.alpha, "k": s.k, "tau": summary["tau"],
            "expected_tau": expected_tau(s.alpha, s.k) if s.alpha is not None else 1.0,
            "tokens_per_forward": tokens_per_forward, "decode_steps": steps,
            "target_forwards": timer.calls["forward"], "decode_tokens": decode_tokens,
            "verify_over_t1": costs[s.k + 1] / costs[1] if s.alpha is not None else 1.0,
            "ideal": ideal, "achieved": achieved, "efficiency": achieved / ideal,
            "decode_wall_s": wall, "decode_walls_s": walls, "profiled_decode_s": profiled_s,
            "ms_per_step": 1e3 * wall / steps,
            "profile_ms_per_step": breakdown(timer, profiled_s, steps),
            "mismatches": sum(o != r for o, r in zip(outputs, refs))}


# ---------------------------------------------------------------------------- targets and prompts

@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a Llama decoder (random weights: only the shapes matter for timing)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int = 4096

    def parameters(self, layers: int | None = None) -> int:
        """About how many weights (embeddings, lm_head, attention and MLP; norms left out)."""
        kv = self.hidden * self.kv_heads // self.heads
        layer = 2 * self.hidden * (self.hidden + kv) + 3 * self.hidden * self.intermediate
        return 2 * self.vocab * self.hidden + (self.layers if layers is None else layers) * layer


SHAPES: dict[str, DecoderShape] = {
    # LLaVA-1.5-7B's language model: Vicuna-7B (Llama-2 7B), vocabulary padded to 32064 by llava-hf
    "llava-7b": DecoderShape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008,
                             vocab=32064),
    # a few-MB stand-in to exercise the path on any machine
    "tiny": DecoderShape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=512),
}


CPU_PARAMETERS = 10**9  # a whole stack above this needs --layers on a CPU


def build_shape_target(shape: DecoderShape, *, layers: int | None = None,
                       device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                       seed: int = 0) -> HFAdapter:
    """A random-weight Llama decoder of ``shape`` (``layers`` overrides its depth) behind the
    causal-LM adapter; fp16 on CUDA and fp32 elsewhere unless ``dtype`` is given. The adapter's
    tokenizer is a small local one: prompts are random ids and nothing is decoded."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ..adapters.causal_lm import CausalLMAdapter
    from ..testing.tiny import CORPUS, train_tokenizer

    n_layers = shape.layers if layers is None else layers
    if n_layers < 1:
        raise ValueError(f"layers must be >= 1, got {n_layers}")
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    config = LlamaConfig(hidden_size=shape.hidden, num_hidden_layers=n_layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         intermediate_size=shape.intermediate, vocab_size=shape.vocab,
                         max_position_embeddings=shape.max_positions, rms_norm_eps=1e-5,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return CausalLMAdapter(model.to(device).eval(), train_tokenizer(CORPUS, family="llava"))


def random_prompts(target: HFAdapter, n: int, length: int, seed: int = 0) -> list[PromptInputs]:
    """``n`` prompts of ``length`` random token ids on the target's device."""
    if length < 1:
        raise ValueError(f"prompt length must be >= 1, got {length}")
    gen = torch.Generator().manual_seed(seed)
    return [PromptInputs(torch.randint(0, target.vocab_size, (length,), generator=gen)
                         .to(target.device)) for _ in range(n)]


def target_prompts(target: HFAdapter, n: int, length: int) -> list[PromptInputs]:
    """Shapes describe prompts for a VLM target, random ids of ``length`` for a causal LM."""
    if target.family == "causal_lm":
        return random_prompts(target, n, length)
    from .run import shapes_prompts

    return shapes_prompts(target, n)


# ---------------------------------------------------------------------------- report

PARTS = ("target forward", "cache edits", "mask building", "verification", "drafter",
         "tree building", "other")


COLUMNS = (("setting", "setting"), ("tau", "tau"), ("expected tau", "expected_tau"),
           ("tokens/fwd", "tokens_per_forward"), ("t_verify/t1", "verify_over_t1"),
           ("ideal", "ideal"), ("achieved", "achieved"), ("efficiency", "efficiency"),
           ("ms/step", "ms_per_step"), ("mismatches", "mismatches"))


def _fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def to_markdown(result: dict, header: str = "") -> str:
    """The efficiency table and the per-step profile table."""
    costs = ", ".join(f"q={q}: {_fmt(t)}" for q, t in result["step_costs_ms"].items())
    lines = [header, "", f"Step costs at mid-generation context (median ms): {costs}", ""]
    lines += _table([c for c, _ in COLUMNS],
                    [[_fmt(r[key]) for _, key in COLUMNS] for r in result["rows"]])
    lines += ["", ("Profiled decode time per step (ms; the profiled run synchronises around "
                   "every timed call)"), ""]
    lines += _table(["setting", *PARTS, "profiled / unprofiled"],
                    [[r["setting"], *(_fmt(r["profile_ms_per_step"][k], ".3f") for k in PARTS),
                      _fmt(r["profiled_decode_s"] / r["decode_wall_s"])] for r in result["rows"]])
    return "\n".join(lines) + "\n"


def write(out: Path, result: dict, meta: dict) -> str:
    """Write ``efficiency.json`` and ``efficiency.md`` under ``out``; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "efficiency.json").write_text(json.dumps({"meta": meta, **result}, indent=2))
    md = to_markdown(result, f"Engine efficiency, oracle chain drafter: {meta['target']}, "
                             f"{meta['items']} prompts, {meta['max_new_tokens']} new tokens, "
                             f"median of {meta['repeats']}; {meta['machine']}")
    (out / "efficiency.md").write_text(md)
    return md


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m lmms_sd.bench.efficiency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--target", help="a saved model directory (VLM or causal LM)")
    which.add_argument("--shape", choices=sorted(SHAPES), help="a random-weight decoder shape")
    ap.add_argument("--layers", type=int, default=None, help="truncate the --shape stack")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.8, 0.6])
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--items", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=600, help="random prompts (causal LMs)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--step-repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    cfg = EfficiencyConfig(tuple(args.alphas), tuple(args.k), args.max_new_tokens, args.repeats,
                           args.step_repeats, args.warmup)
    if args.shape is not None:
        shape = SHAPES[args.shape]
        if torch.device(args.device).type == "cpu" and args.layers is None and \
                shape.parameters() > CPU_PARAMETERS:
            raise SystemExit(f"--shape {args.shape} on a CPU needs --layers N (a truncated "
                             "stack); a CPU run of this shape only checks that the code runs")
        target = build_shape_target(shape, layers=args.layers, device=args.device)
        name = f"{args.shape} random weights" + (f", {args.layers} layers" if args.layers else "")
    else:
        from ..adapters.loading import load_adapter

        target, name = load_adapter(args.target, device=args.device), args.target
    from .run import machine

    result = measure(target, target_prompts(target, args.items, args.prompt_len), cfg)
    meta = {"target": name, "device": str(target.device), "dtype": str(target.dtype),
            "items": args.items, "machine": machine(), **asdict(cfg)}
    print(write(Path(args.out), result, meta))
    return result


if __name__ == "__main__":
    main()

"""The speculative decoding loop (and the autoregressive baseline through the same code path).

One step, in order:
  1. draft    the tree builder asks the drafter for a ``DraftTree`` hanging from the root
  2. verify   one target forward over [root, nodes] with the tree mask; a pure verify function
              picks the accepted path and the target's next token
  3. commit   the target cache keeps the root and the accepted path (index select)
  4. emit     accepted tokens + next token are appended, cut at EOS / stop string / budget
  5. inform   the drafter is told what was emitted (with target features if it wants them)
With ``drafter=None`` step 1 yields an empty tree and the loop is plain greedy/sampled decoding.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from .interfaces import Drafter, ModelAdapter, PromptInputs
from .sampling import SamplingConfig, logits_to_probs, sample
from .tree import DraftTree
from .verify import Verdict, verify_greedy, verify_stochastic

TARGET, DRAFT = "target", "draft"


@dataclass(frozen=True)
class GenerationConfig:
    """max_length: the most positions the target holds (prompt + new tokens), None: no limit.
    A request decodes ``budget(prompt length)`` new tokens at most."""

    max_new_tokens: int = 64
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    sampling: SamplingConfig = SamplingConfig()
    seed: int | None = None
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def budget(self, prompt_len: int) -> int:
        """max_new_tokens, clipped to the room ``max_length`` leaves after the prompt."""
        if self.max_length is None:
            return self.max_new_tokens
        room = self.max_length - prompt_len
        if room < 1:
            raise ValueError(f"the prompt has {prompt_len} tokens and the target holds at most "
                             f"{self.max_length} positions (its max_position_embeddings): "
                             f"shorten the prompt or use fewer / smaller images")
        return min(self.max_new_tokens, room)


@dataclass
class StepStats:
    """accepted: the tokens this step emitted, less one (in an uncut step, its accepted drafts).
    The step cut at EOS / stop string / budget counts only the tokens before the cut, so there
    the last emitted token may be an accepted draft ("draft" in ``origin``) that ``accepted``
    does not count: sum(accepted + 1) over the steps is always the emitted tokens less one."""

    tree_size: int
    tree_depth: int
    accepted: int
    expected_accept: float | None


@dataclass
class GenerationStats:
    """Counters of one request. ``tau`` = emitted tokens per target decode step (the mean
    accepted length + 1, as MSD and EAGLE report it); the prefill forward is not a step."""

    new_tokens: int = 0
    target_forwards: int = 0      # including the prefill
    draft_forwards: int = 0
    prefill_time: float = 0.0
    wall_time: float = 0.0        # prefill + decode
    steps: list[StepStats] = field(default_factory=list)
    origin: list[str] = field(default_factory=list)  # per emitted token: "draft" or "target"

    @property
    def decode_steps(self) -> int:
        return len(self.steps)

    @property
    def tau(self) -> float:
        n = len(self.steps)
        return sum(s.accepted + 1 for s in self.steps) / n if n else 0.0

    @property
    def drafted(self) -> int:
        return sum(s.tree_depth for s in self.steps)

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens per drafted depth (the chain acceptance rate for chains)."""
        d = self.drafted
        return sum(s.accepted for s in self.steps) / d if d else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_time if self.wall_time > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens, "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards, "decode_steps": self.decode_steps,
            "tau": self.tau, "acceptance_rate": self.acceptance_rate,
            "prefill_time": self.prefill_time, "wall_time": self.wall_time,
            "tokens_per_second": self.tokens_per_second,
            "accepted_per_step": [s.accepted for s in self.steps],
            "tree_size_per_step": [s.tree_size for s in self.steps],
            "tree_depth_per_step": [s.tree_depth for s in self.steps],
            "expected_accept_per_step": [s.expected_accept for s in self.steps],
            "origin": "".join("d" if o == DRAFT else "t" for o in self.origin),
        }


@dataclass
class GenerationResult:
    tokens: list[int]
    stats: GenerationStats


class StopChecker:
    """Finds where plain decoding would stop within a block of newly emitted tokens."""

    def __init__(self, cfg: GenerationConfig, decode: Callable[[Sequence[int]], str] | None):
        if cfg.stop_strings and decode is None:
            raise ValueError("stop strings need a decode function")
        self.cfg, self.decode, self.eos = cfg, decode, set(cfg.eos_token_ids)

    def cut(self, out: list[int], n_new: int) -> int | None:
        """Given ``out`` whose last ``n_new`` tokens are new, return the length to cut ``out``
        to if decoding stops inside the block, else None."""
        # Token by token, as plain decoding checks: a prefix's text is not always a prefix of
        # the longer text (a byte-level token completing a character), so a stop string seen
        # after token j may be gone after token j + 1; and EOS after a stop string is not reached.
        for j in range(len(out) - n_new, len(out)):
            if out[j] in self.eos or j + 1 >= self.cfg.max_new_tokens:
                return j + 1
            if self.cfg.stop_strings and self._has_stop(out[: j + 1]):
                return j + 1
        return None

    def _has_stop(self, ids: Sequence[int]) -> bool:
        text = self.decode(ids)
        return any(s in text for s in self.cfg.stop_strings)


def _pick(logits: torch.Tensor, sampling: SamplingConfig, gen: torch.Generator | None) -> int:
    if sampling.greedy:
        return int(logits.argmax())
    return sample(logits_to_probs(logits, sampling), gen)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trim_last_step(stats: GenerationStats, emitted: int) -> None:
    """The last step emitted only ``emitted`` of its tokens (EOS / stop / budget): count only
    those, so that sum(accepted + 1) over steps == new_tokens - 1 (the root is from prefill)."""
    stats.steps[-1].accepted = emitted - 1


StepObserver = Callable[[DraftTree, torch.Tensor, Verdict], None]


def _kept_slots(verdict: Verdict, device: torch.device) -> torch.Tensor:  # -> [1 + accepted]
    """The verify forward's slots to keep: the root and the accepted path."""
    return torch.tensor([0] + [i + 1 for i in verdict.accepted], device=device)


def generate(target: ModelAdapter, prompt: PromptInputs, cfg: GenerationConfig,
             drafter: Drafter | None = None, builder: Callable | None = None,
             decode: Callable[[Sequence[int]], str] | None = None,
             observer: StepObserver | None = None) -> GenerationResult:
    """Decode one request. Greedy output equals the target's own greedy output token for token;
    sampled output follows the target's (processed) distribution.

    observer(tree, target_logits [N+1, V], verdict) is called after each verification, e.g. to
    collect calibration traces from the verify forward at no extra target cost."""
    if (drafter is None) != (builder is None):
        raise ValueError("pass both a drafter and a tree builder, or neither")
    cfg = replace(cfg, max_new_tokens=cfg.budget(len(prompt.input_ids)))
    stop = StopChecker(cfg, decode)
    gen = None
    if not cfg.sampling.greedy:
        gen = torch.Generator()
        gen.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    want_hidden = drafter is not None and drafter.needs_target_hidden
    stats = GenerationStats()
    draft_forwards0 = drafter.forwards if drafter is not None else 0
    device = prompt.input_ids.device
    t0 = time.perf_counter()

    pre = target.prefill(prompt, hidden=want_hidden, embeds=want_hidden)
    stats.target_forwards = 1
    root = _pick(pre.logits[-1], cfg.sampling, gen)
    out, stats.origin = [root], [TARGET]
    _sync(device)
    stats.prefill_time = time.perf_counter() - t0
    done = stop.cut(out, 1) is not None
    if drafter is not None and not done:
        drafter.begin(prompt, pre)
        drafter.commit([root], pre.hidden[-1:] if want_hidden else None)

    empty = DraftTree.empty(device)
    while not done:
        # 1. draft, never deeper than the budget left (so never past max_length)
        room = cfg.max_new_tokens - len(out) - 1
        if drafter is None or room == 0:
            tree = empty
        else:
            tree = builder(drafter, cfg.sampling, gen).within_depth(room)
        # 2. verify: one target forward over [root, nodes]
        start = target.seq_len
        slots = torch.tensor([root] + tree.token_list, device=device)
        if tree.is_chain:  # plain causal attention: let the model use its fast path
            res = target.forward(slots, hidden=want_hidden)
        else:
            res = target.forward(slots, start + tree.slot_depths().to(device),
                                 tree.attention_mask(start).to(device), hidden=want_hidden)
        stats.target_forwards += 1
        if cfg.sampling.greedy:
            verdict = verify_greedy(tree, res.logits)
        else:
            verdict = verify_stochastic(tree, logits_to_probs(res.logits, cfg.sampling), gen)
        if observer is not None:
            observer(tree, res.logits, verdict)
        # 3. commit the root and the accepted path in the target cache
        n_kept = 1 + verdict.num_accepted
        kept = None
        if n_kept < len(slots):  # something was rejected
            if tree.is_chain:  # the accepted path is a prefix of the slots: a crop, no copy
                target.crop(start + n_kept)
            else:
                kept = _kept_slots(verdict, device)
                target.keep(start, kept)
        # 4. emit (hot path: Python lists, no host syncs)
        tokens = tree.token_list
        new = [tokens[i] for i in verdict.accepted] + [verdict.next_token]
        out += new
        stats.origin += [DRAFT] * verdict.num_accepted + [TARGET]
        stats.steps.append(StepStats(len(tree), tree.depth, verdict.num_accepted,
                                     tree.expected_accept))
        cut = stop.cut(out, len(new))
        if cut is not None:
            _trim_last_step(stats, len(new) - (len(out) - cut))
            del out[cut:], stats.origin[cut:]
            break
        root = verdict.next_token
        # 5. inform the drafter
        if drafter is not None:
            hidden = None
            if want_hidden and tree.is_chain:  # the kept slots are a prefix
                hidden = res.hidden[:n_kept]
            elif want_hidden:
                hidden = res.hidden[kept if kept is not None else _kept_slots(verdict, device)]
            drafter.commit(new, hidden)

    _sync(device)
    stats.wall_time = time.perf_counter() - t0
    stats.new_tokens = len(out)
    stats.draft_forwards = drafter.forwards - draft_forwards0 if drafter is not None else 0
    return GenerationResult(out, stats)

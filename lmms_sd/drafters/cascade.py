"""Cascade speculative drafting (CS Drafting, Chen et al. 2023) as a drafter of the target's loop.

Design
------
The cascade is a proposal machine. Each target step it computes one chain of draft tokens with
the vertical and horizontal cascades below; the core loop then verifies that chain exactly
against the target (greedy: token-identical output; sampling: a point-mass draft under the
lossless multi-draft rule). Lenient reviews inside the cascade change the speed, never the output.

Every member of the cascade is an ordinary ``Drafter`` (a draft model, MaG, ...). Within one
target step the cascade obtains a draft's logits after any context "committed text + path" by
growing that draft's working tree: ``root()`` once, then one ``expand()`` of the missing nodes
(``_DraftView``). Scored contexts are reused, so a review of m proposed tokens is one ``expand``
call, i.e. one forward of a draft model.

The chain reaches the loop in one of two ways:
  CascadeBuilder  calls ``propose_chain()`` and returns the chain as a ``DraftTree``: the chain
                  has whatever length the cascade produced (recommended);
  any builder     through ``root()``/``expand()``, which replay the chain as one-hot logits
                  (0 on the proposal, -inf elsewhere); a node beyond the chain, or off it, gets
                  the cascade's proposal for that context, computed on demand. So
                  ``ChainBuilder(k)`` works as well, with a fixed length k.

Algorithm (the published ``csd.py::_csd_iteration``, reviewer by reviewer)
---------
drafts     D_0, ..., D_{n-1}, large to small; D_{n-1} is the bottom draft (usually MaG).
reviewer   r = -1 is the target, r >= 0 is draft D_r. Row ``r + 1`` of the n x n ``k_matrix``
           holds the quotas of the drafts below reviewer r: ``k_matrix[r+1][j]`` tokens come
           from D_j (j > r); entries below the diagonal are unused and must be 0.
fill(r, path)   the proposal for reviewer r after ``path``. For j = r+1 .. n-1 (horizontal
           cascade): while the proposal is shorter than ``sum(k_matrix[r+1][r+1 : j+1])``, append
           - if D_j is the bottom draft: its greedy tokens, exactly up to the quota;
           - else (vertical cascade) step(j, path + proposal): D_j reviews fill(j, ...) and
             yields its accepted prefix plus its own next token (so it may overshoot the quota).
review     D_j accepts proposed token x (after the already-accepted prefix) iff x is D_j's argmax,
           or lenience L > 1 and p_j(x) > p_prop(x) / L, where p_prop(x) is the probability of x
           at the level that proposed it: the bottom draft's softmax (1 for MaG), or for tokens
           coming out of a step of D_i, D_i's own softmax. The first rejected token is replaced by
           D_j's argmax; if all are accepted D_j adds its argmax after them. p = plain softmax.
target     the chain is fill(-1, ()). Its review is the core loop's exact verification (L = 1).

Deviations from the published code: the bottom draft proposes exactly the missing quota (the
published bottom draft always proposes ``_MAG_GENERATION`` = 10 tokens: ``bottom_tokens=10``;
and any bottom draft gets one-hot probabilities); each
token carries its own proposal probability (the published ``review`` pairs the probabilities
one position off); MaG matches token by token (see ``ngram.py``). Published ``k_matrix``
entries are per-draft increments: the paper's k_12 is ``k_matrix[0][0] + k_matrix[0][1]``.

Sampling: every review inside the cascade is greedy, so the chain is deterministic given the
context; the core accepts a point-mass draft x with probability p_target(x), which is lossless.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..core.generate import GenerationConfig, GenerationResult, generate
from ..core.interfaces import Drafter, ModelAdapter, PromptInputs, StepOutput
from ..core.sampling import SamplingConfig
from ..core.tree import DraftTree
from .cost import CostReport, simulate_cost

Context = tuple[int, ...]  # token ids after this step's root (the root itself excluded)


# Published configurations (CS Drafting README.md / main.py) by the number of drafts: the
# target's row and, for three drafts, the middle draft's; the bottom column is always 10.
PUBLISHED_DEFAULTS: dict[int, tuple[tuple[tuple[int, ...], ...], float]] = {
    1: (((10,),), 1.0),                                    # MaG alone: csd() default leniency
    2: (((13, 10), (0, 10)), 3.0),                         # LLaMA-7B, llama-160m + MaG
    3: (((5, 14, 10), (0, 1, 10), (0, 0, 10)), 2.0),       # FLAN-T5-xxl, base + small + MaG
}


@dataclass(frozen=True)
class CascadeConfig:
    """k_matrix: n x n quotas (module docstring), n = number of drafts; lenience L >= 1 for the
    reviews inside the cascade (the target's review is always exact); bottom_tokens: how many
    tokens the bottom draft proposes per call: None = exactly the missing quota, 10 = the
    published cascade (``_MAG_GENERATION``; the chain may then overshoot the quotas)."""

    k_matrix: tuple[tuple[int, ...], ...]
    lenience: float = 1.0
    bottom_tokens: int | None = None

    def __post_init__(self) -> None:
        k, n = self.k_matrix, len(self.k_matrix)
        if n == 0 or any(len(row) != n for row in k):
            raise ValueError(f"k_matrix must be square (n x n, n drafts), got row lengths "
                             f"{[len(row) for row in k]}")
        for i, row in enumerate(k):
            for j, v in enumerate(row):
                if not isinstance(v, int) or v < 0:
                    raise ValueError(f"k_matrix[{i}][{j}] = {v!r} must be an int >= 0")
                if j < i and v != 0:
                    raise ValueError(f"k_matrix[{i}][{j}] = {v} lies below the diagonal, "
                                     "which is unused; set it to 0")
        if sum(k[0]) < 1:
            raise ValueError(f"k_matrix[0] = {k[0]} proposes no token to the target")
        if not self.lenience >= 1:
            raise ValueError(f"lenience must be >= 1, got {self.lenience}")
        if self.bottom_tokens is not None and self.bottom_tokens < 1:
            raise ValueError(f"bottom_tokens must be >= 1 (or None), got {self.bottom_tokens}")

    @staticmethod
    def published(n_drafts: int, k_matrix: Sequence[Sequence[int]] | None = None,
                  lenience: float | None = None, bottom_tokens: int | None = None
                  ) -> "CascadeConfig":
        """The settings with CS Drafting's published k_matrix and lenience for ``n_drafts``
        drafts wherever ``k_matrix`` / ``lenience`` are None."""
        if (k_matrix is None or lenience is None) and n_drafts not in PUBLISHED_DEFAULTS:
            raise ValueError(f"CS Drafting publishes k_matrix and lenience for 1-3 drafts, not "
                             f"{n_drafts}: give both (k_matrix='a b;0 c', lenience=L)")
        k_default, l_default = PUBLISHED_DEFAULTS.get(n_drafts, ((), 1.0))
        return CascadeConfig.of(k_default if k_matrix is None else k_matrix,
                                l_default if lenience is None else lenience, bottom_tokens)

    @staticmethod
    def of(k_matrix: Sequence[Sequence[int]] | Tensor, lenience: float = 1.0,
           bottom_tokens: int | None = None) -> "CascadeConfig":
        """From nested lists or a tensor, as the published code takes it."""
        rows = k_matrix.tolist() if isinstance(k_matrix, Tensor) else k_matrix
        return CascadeConfig(tuple(tuple(int(v) for v in row) for row in rows), float(lenience),
                             bottom_tokens)

    @property
    def depth(self) -> int:
        return len(self.k_matrix)


@dataclass
class CascadeCounts:
    """Per-request counters (since ``begin``), one entry per draft, large to small."""

    reviews: list[int]        # review passes (the published forward count)
    forwards: list[int]       # model calls (``Drafter.forwards``)
    lenient_accepts: int      # proposals accepted by the lenience test, not by argmax
    chain_lengths: list[int]  # tokens proposed to the target, per step


@dataclass
class _Proposal:
    tokens: list[int]
    probs: list[float]  # each token's probability at the level that proposed it


class _DraftView:
    """One draft's logits after contexts ``path`` (relative to this step's root)."""

    def __init__(self, drafter: Drafter):
        self.drafter = drafter
        self.reset()

    def reset(self) -> None:
        self._node: dict[Context, int] = {}   # context -> node index in the draft's working tree
        self._row: dict[Context, Tensor] = {}  # context -> # [V] logits after it
        self._n = 0

    def rows_along(self, path: Context, ext: Sequence[int]) -> Tensor:  # [len(ext) + 1, V]
        """Logits after ``path``, ``path + ext[:1]``, ..., ``path + ext``: at most one
        ``root()`` and one ``expand()`` of the contexts not scored yet."""
        full = path + tuple(ext)
        if () not in self._row:
            self._row[()], self._node[()] = self.drafter.root(), -1
        known = len(full)
        while full[:known] not in self._row:
            known -= 1
        missing = full[known:]
        if missing:
            parents = [self._node[full[:known]]] + list(range(self._n, self._n + len(missing) - 1))
            rows = self.drafter.expand(torch.tensor(missing, dtype=torch.long),
                                       torch.tensor(parents, dtype=torch.long))
            for i in range(len(missing)):
                key = full[:known + i + 1]
                self._node[key], self._row[key] = self._n + i, rows[i]
            self._n += len(missing)
        return torch.stack([self._row[full[:i]] for i in range(len(path), len(full) + 1)])


class CascadeDrafter:
    """The cascade of ``drafts`` (large to small) behind the ``Drafter`` protocol."""

    def __init__(self, drafts: Sequence[Drafter], cfg: CascadeConfig, name: str | None = None):
        if len(drafts) != cfg.depth:
            raise ValueError(f"k_matrix is {cfg.depth} x {cfg.depth} but {len(drafts)} drafts "
                             "were given: one row and column per draft")
        self.drafts, self.cfg = list(drafts), cfg
        self.name = name or "cascade(" + ",".join(d.name for d in self.drafts) + ")"
        self.needs_target_hidden = any(d.needs_target_hidden for d in self.drafts)
        self._views = [_DraftView(d) for d in self.drafts]
        self._forwards0 = [0] * len(self.drafts)
        self._reviews = [0] * len(self.drafts)
        self._lenient = 0
        self._chain_lengths: list[int] = []
        self._reset_step()

    @property
    def forwards(self) -> int:
        return sum(d.forwards for d in self.drafts)

    def counts(self) -> CascadeCounts:
        return CascadeCounts(list(self._reviews),
                             [d.forwards - f0 for d, f0 in zip(self.drafts, self._forwards0)],
                             self._lenient, list(self._chain_lengths))

    # ------------------------------------------------------------------ Drafter protocol
    def begin(self, prompt: PromptInputs, target_prefill: StepOutput) -> None:
        for d in self.drafts:
            d.begin(prompt, target_prefill)
        self._forwards0 = [d.forwards for d in self.drafts]
        self._reviews = [0] * len(self.drafts)
        self._lenient, self._chain_lengths = 0, []
        self._reset_step()

    def commit(self, tokens: list[int], hidden: Tensor | None) -> None:
        for d in self.drafts:
            d.commit(tokens, hidden if d.needs_target_hidden else None)
        self._reset_step()

    def root(self) -> Tensor:  # [V]
        return self._one_hot([self._proposal(())])[0]

    def expand(self, tokens: Tensor, parents: Tensor) -> Tensor:  # [m], [m] -> [m, V]
        proposals = []
        for tok, par in zip(tokens.tolist(), parents.tolist()):
            path = (self._paths[par] if par >= 0 else ()) + (tok,)
            self._paths.append(path)
            proposals.append(self._proposal(path))
        return self._one_hot(proposals)

    def propose_chain(self) -> list[int]:
        """This step's chain for the target (computed once per step)."""
        if self._chain is None:
            self._chain = self._extend(())
            self._chain_lengths.append(len(self._chain))
        return self._chain

    # ------------------------------------------------------------------ replay
    def _reset_step(self) -> None:
        for view in self._views:
            view.reset()
        self._chain: list[int] | None = None
        self._next: dict[Context, int] = {}   # context -> the cascade's proposal after it
        self._paths: list[Context] = []       # per node expanded by the builder: its path
        self._vocab, self._device = 0, torch.device("cpu")

    def _extend(self, path: Context) -> list[int]:
        chain = self._fill(-1, path).tokens
        for i, t in enumerate(chain):
            self._next.setdefault(path + tuple(chain[:i]), t)
        return chain

    def _proposal(self, path: Context) -> int:
        if not path:
            self.propose_chain()
        if path not in self._next:
            self._extend(path)
        return self._next[path]

    def _one_hot(self, proposals: list[int]) -> Tensor:  # [m, V]
        dev = self._device
        rows = torch.full((len(proposals), self._vocab), float("-inf"), device=dev)
        rows[torch.arange(len(proposals), device=dev), torch.tensor(proposals, device=dev)] = 0.0
        return rows

    # ------------------------------------------------------------------ the cascade
    def _fill(self, reviewer: int, path: Context) -> _Proposal:
        """The proposal for ``reviewer`` (-1: the target) after ``path``."""
        n, quotas = len(self.drafts), self.cfg.k_matrix[reviewer + 1]
        out, quota = _Proposal([], []), 0
        for j in range(reviewer + 1, n):
            quota += quotas[j]
            while len(out.tokens) < quota:
                ctx = path + tuple(out.tokens)
                more = (self._bottom(ctx, self.cfg.bottom_tokens or quota - len(out.tokens))
                        if j == n - 1 else self._draft_step(j, ctx))
                out.tokens += more.tokens
                out.probs += more.probs
        return out

    def _draft_step(self, j: int, path: Context) -> _Proposal:
        """Draft j reviews the proposal of the drafts below it: accepted prefix + its next token."""
        prop = self._fill(j, path)
        probs = self._probs(self._views[j].rows_along(path, prop.tokens))  # [m + 1, V]
        self._reviews[j] += 1
        best = probs.argmax(-1).tolist()
        lenience, n_ok = self.cfg.lenience, 0
        for x, p_prop in zip(prop.tokens, prop.probs):
            if x != best[n_ok]:
                if not (lenience > 1 and float(probs[n_ok, x]) > p_prop / lenience):
                    break
                self._lenient += 1
            n_ok += 1
        tokens = prop.tokens[:n_ok] + [best[n_ok]]
        return _Proposal(tokens, [float(probs[i, t]) for i, t in enumerate(tokens)])

    def _bottom(self, path: Context, need: int) -> _Proposal:
        """The bottom draft's greedy tokens after ``path``."""
        out = _Proposal([], [])
        for _ in range(need):
            p = self._probs(self._views[-1].rows_along(path + tuple(out.tokens), ()))[0]  # [V]
            t = int(p.argmax())
            out.tokens.append(t)
            out.probs.append(float(p[t]))
        return out

    def _probs(self, rows: Tensor) -> Tensor:  # [m, V] logits -> [m, V] softmax
        self._vocab, self._device = rows.shape[-1], rows.device
        return torch.softmax(rows.float(), dim=-1)


@dataclass(frozen=True)
class CascadeBuilder:
    """Tree builder for a ``CascadeDrafter``: its chain, as deterministic (point-mass) drafts.
    ``sampling`` does not change the chain; verification handles sampling losslessly."""

    def __call__(self, drafter: Drafter, sampling: SamplingConfig,
                 generator: torch.Generator | None = None) -> DraftTree:
        if not isinstance(drafter, CascadeDrafter):
            raise TypeError(f"CascadeBuilder needs a CascadeDrafter, got {type(drafter).__name__}")
        return DraftTree.chain(torch.tensor(drafter.propose_chain(), dtype=torch.long))


def cascade_cost(result: GenerationResult, cascade: CascadeDrafter, target_name: str,
                 counter_version: str = "model_parameters", counting: str = "reviews",
                 overrides: Mapping[str, float] | None = None) -> CostReport:
    """The simulated cost (``cost.py``) of the request that ``result`` holds, which must be the
    last one ``cascade`` served."""
    counts = cascade.counts()
    per_draft = counts.reviews if counting == "reviews" else counts.forwards
    names = [d.name for d in cascade.drafts]
    if len(set(names)) != len(names):
        raise ValueError(f"draft names must be unique for cost accounting, got {names}")
    return simulate_cost(target_name, result.stats.target_forwards, dict(zip(names, per_draft)),
                         result.stats.new_tokens, counter_version, counting, overrides)


def csd(draft_list: Sequence[Drafter], target_model: ModelAdapter,
        initial_input: PromptInputs | Tensor, k_matrix: Sequence[Sequence[int]] | Tensor,
        max_length: int = 200, leniency: float = 1.0, *, eos_token_ids: Sequence[int] = (),
        sampling: SamplingConfig = SamplingConfig(), seed: int | None = None) -> GenerationResult:
    """CS Drafting's entry point (published ``csd.csd``) on our loop.

    Mapping from ``csd(draft_list, target_model, initial_input, input_ids, k_matrix,
    max_length=200, leniency=1)``:
      draft_list     Drafters large to small, MaG last if wanted (``MaGDrafter``);
      target_model   a ModelAdapter (the published wrapper of an HF model);
      initial_input  the prompt: PromptInputs, or token ids [T] / [1, T]; ``input_ids`` is
                     dropped (decoder-only targets: it equalled the prompt);
      k_matrix, leniency  as published (``CascadeConfig``);
      max_length     new tokens, cut exactly (the published loop may overshoot);
      EOS            ``eos_token_ids`` (the published code hard-codes 1 for T5, 2 otherwise).
    Returns our ``GenerationResult`` (new tokens and stats), not prompt + output ids.
    """
    if isinstance(initial_input, Tensor):
        initial_input = PromptInputs(initial_input.reshape(-1))
    cascade = CascadeDrafter(draft_list, CascadeConfig.of(k_matrix, leniency))
    cfg = GenerationConfig(max_new_tokens=max_length, eos_token_ids=tuple(eos_token_ids),
                           sampling=sampling, seed=seed)
    return generate(target_model, initial_input, cfg, cascade, CascadeBuilder())

"""Draft-side recording for acceptance traces: what each slot's draft distribution and image
attention were, read from the drafter's own forwards of the step.

A verified tree needs, per slot s (0 = root, i+1 = node i), the draft distribution q_s that the
children of s were chosen from and the draft's image-attention mass at the query that produced
q_s (``features.py``). Tree builders discard both, so ``TracingDrafter`` wraps any drafter and
keeps them, indexed by *expanded node* (the drafter protocol's numbering: the i-th node passed
to ``expand`` in this step; -1 = the root). ``slot_view`` maps a finished tree's nodes back to
expanded nodes by (parent, token), which works for any builder, including ones that keep only
some of the nodes they expanded.

Image attention comes from ``AttentionTap``, an adapter proxy that asks every decode forward of
a draft model for its last layer's head-averaged attention (eager attention only) and keeps the
mass each query puts on the prompt's image positions. An MSD head is its own tap
(``MSDDrafter.record_attention``: the head's last-layer attention on the prompt's image slots).
A drafter that cannot see the image (a text-only LM) has mass 0 everywhere.

``TraceObserver`` is a ``generate()`` observer that labels every verified step with
``records_from_tree``; it reads the verify forward the loop has already run, so collection costs
no target forward.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.interfaces import Drafter, ModelAdapter, PromptInputs, StepOutput
from ..core.sampling import SamplingConfig, logits_to_probs
from ..core.tree import DraftTree
from ..core.verify import Verdict
from ..drafters.model import ModelDrafter
from ..drafters.msd import MSDDrafter
from .features import image_attention_mass
from .traces import TraceRecord, records_from_tree


class AttentionTap:
    """A ``ModelAdapter`` proxy whose decode forwards also compute the draft's image attention.

    ``last_mass`` # [Q] is the image-attention mass of each query of the latest ``forward``.
    Everything else (cache, keep, crop, tokenizer, ...) is the wrapped adapter's.
    """

    def __init__(self, adapter: ModelAdapter) -> None:
        impl = getattr(getattr(adapter, "decoder", None), "config", None)
        impl = getattr(impl, "_attn_implementation", None)
        if impl is not None and impl != "eager":
            raise ValueError(f"reading the draft's image attention needs a draft model loaded "
                             f"with attn_implementation='eager', this one uses {impl!r}")
        self.inner = adapter
        self.image_mask: Tensor | None = None  # [T] bool over the draft's prompt
        self.last_mass: Tensor | None = None   # [Q]

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    @property
    def seq_len(self) -> int:
        return self.inner.seq_len

    def prefill(self, prompt: PromptInputs, *, hidden: bool = False,
                embeds: bool = False) -> StepOutput:
        self.image_mask = prompt.image_mask
        self.last_mass = None
        return self.inner.prefill(prompt, hidden=hidden, embeds=embeds)

    def forward(self, tokens: Tensor, positions: Tensor | None = None,
                mask: Tensor | None = None, *, hidden: bool = False,
                attentions: bool = False) -> StepOutput:
        out = self.inner.forward(tokens, positions, mask, hidden=hidden, attentions=True)
        if self.image_mask is None or not bool(self.image_mask.any()):
            self.last_mass = torch.zeros(len(tokens))
        else:
            self.last_mass = image_attention_mass(out.attentions, self.image_mask).cpu()
        if not attentions:
            out.attentions = None
        return out

    def keep(self, start: int, indices: Tensor) -> None:
        self.inner.keep(start, indices)

    def crop(self, length: int) -> None:
        self.inner.crop(length)

    def __getattr__(self, name: str) -> Any:  # tokenizer, decode, device, ...
        if name == "inner":  # not yet set (e.g. during copying): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def with_attention_tap(drafter: Drafter) -> tuple[Drafter, AttentionTap | MSDDrafter | None]:
    """The drafter rebuilt over an ``AttentionTap`` when it is a draft model that sees the
    image, an MSD drafter recording its own attention (it is its own tap), else unchanged with
    no tap. Any other drafter is an error: it cannot report attention (pass ``attention=False``
    to the caller's settings to use 0 for every candidate). Both taps expose ``last_mass``."""
    if isinstance(drafter, MSDDrafter):
        drafter.record_attention = True
        return drafter, drafter
    if isinstance(drafter, ModelDrafter):
        if drafter.text_only:
            return drafter, None
        tap = AttentionTap(drafter.adapter)
        return ModelDrafter(tap, vocab_size=drafter.vocab_size, name=drafter.name), tap
    raise ValueError(f"drafter {getattr(drafter, 'name', type(drafter).__name__)!r} "
                     f"({type(drafter).__name__}) cannot report its image attention; "
                     f"only a draft model or an MSD head can. Use attention=false.")


class TracingDrafter:
    """A drafter wrapper that remembers this step's draft logits and image attention per
    expanded node (see the module docstring). ``keep_logits`` False keeps only the attention,
    which is all that steering needs."""

    def __init__(self, inner: Drafter, tap: AttentionTap | MSDDrafter | None = None,
                 keep_logits: bool = True) -> None:
        self.inner, self.tap, self.keep_logits = inner, tap, keep_logits
        self.name = inner.name
        self.needs_target_hidden = inner.needs_target_hidden
        self._reset()

    @property
    def forwards(self) -> int:
        return self.inner.forwards

    # ------------------------------------------------------------------ drafter protocol
    def begin(self, prompt: PromptInputs, target_prefill: StepOutput) -> None:
        self.inner.begin(prompt, target_prefill)
        self._reset()

    def commit(self, tokens: list[int], hidden: Tensor | None) -> None:
        self.inner.commit(tokens, hidden)
        self._reset()

    def root(self) -> Tensor:  # [V]
        logits = self.inner.root()
        self._reset()
        self._root_logits = logits if self.keep_logits else None
        self._root_mass = float(self._mass(1)[-1])
        return logits

    def expand(self, tokens: Tensor, parents: Tensor) -> Tensor:  # [m], [m] -> [m, V]
        logits = self.inner.expand(tokens, parents)
        first = len(self._masses)
        for i, key in enumerate(zip(parents.tolist(), tokens.tolist())):
            self._index.setdefault(key, first + i)
        self._masses += self._mass(len(tokens)).tolist()
        if self.keep_logits:
            self._rows.append(logits)
        return logits

    # ------------------------------------------------------------------ readouts
    def attention(self, expanded: Tensor) -> Tensor:  # [m] long (-1 = root) -> [m] float
        """Image-attention mass at the query of each expanded node (the root for -1)."""
        table = torch.tensor([self._root_mass] + self._masses)
        return table[expanded.cpu() + 1]

    def expanded_ids(self, tree: DraftTree) -> list[int | None]:
        """For each tree node, its expanded-node id in this step, or None if never expanded."""
        ids: list[int | None] = []
        for i, (tok, par) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist())):
            parent = -1 if par < 0 else ids[par]
            if parent is None:
                raise ValueError(f"tree node {i} hangs from node {par}, which the drafter never "
                                 f"expanded in this step: it cannot have been drafted")
            ids.append(self._index.get((parent, tok)))
        return ids

    def slot_view(self, tree: DraftTree, sampling: SamplingConfig) -> tuple[Tensor, Tensor]:
        """The processed draft distribution # [N+1, V] and image-attention mass # [N+1] of every
        slot of ``tree`` (rows of slots never expanded are 0: they have no children)."""
        if not self.keep_logits:
            raise RuntimeError("slot_view needs keep_logits=True")
        if self._root_logits is None:
            raise RuntimeError("slot_view needs root() to have run in this step")
        ids = self.expanded_ids(tree)
        root = self._root_logits
        rows = torch.cat(self._rows) if self._rows else root.new_zeros(0, root.shape[-1])
        probs = root.new_zeros(len(ids) + 1, root.shape[-1], dtype=torch.float32)
        probs[0] = logits_to_probs(root, sampling)
        where = [i + 1 for i, e in enumerate(ids) if e is not None]
        if where:
            picked = rows[[e for e in ids if e is not None]]
            probs[where] = logits_to_probs(picked, sampling)
        slot_ids = torch.tensor([-1] + [-1 if e is None else e for e in ids])
        attn = self.attention(slot_ids)
        attn[[i + 1 for i, e in enumerate(ids) if e is None]] = 0.0
        return probs, attn

    # ------------------------------------------------------------------ internals
    def _mass(self, q: int) -> Tensor:  # [q] the last forward's image mass per query
        if self.tap is None:
            return torch.zeros(q)
        mass = self.tap.last_mass
        if mass is None or len(mass) < q:
            raise RuntimeError(f"the attention tap saw no forward of {q} queries for this call")
        return mass[-q:]

    def _reset(self) -> None:
        self._root_logits: Tensor | None = None  # [V]
        self._root_mass = 0.0
        self._rows: list[Tensor] = []             # per expand call: # [m, V]
        self._masses: list[float] = []            # per expanded node
        self._index: dict[tuple[int, int], int] = {}  # (parent id, token) -> expanded id


class TraceObserver:
    """A ``generate()`` observer that appends the ``TraceRecord``s of every verified step.

    categories: # [V] category id per token id (``category_table``)
    """

    def __init__(self, drafter: TracingDrafter, categories: np.ndarray,
                 sampling: SamplingConfig) -> None:
        self.drafter, self.categories, self.sampling = drafter, categories, sampling
        self.records: list[TraceRecord] = []

    def __call__(self, tree: DraftTree, target_logits: Tensor, verdict: Verdict) -> None:
        # target_logits: # [N+1, V] the verify forward's logits per slot
        if len(tree) == 0:
            return
        draft_probs, attention = self.drafter.slot_view(tree, self.sampling)
        target_probs = logits_to_probs(target_logits, self.sampling)
        self.records += records_from_tree(tree, target_probs, draft_probs.to(target_probs.device),
                                          self.categories, attention)

"""The two contracts the core loop is written against: a model adapter and a drafter.

The core never imports a model family. Adapters (``lmms_sd/adapters``) wrap a Hugging Face model
and its KV cache; drafters (``lmms_sd/drafters``) propose draft tokens; tree builders
(``lmms_sd/trees``) turn a drafter's scores into a ``DraftTree``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@dataclass
class PromptInputs:
    """A prepared prompt for one request (batch size 1).

    input_ids:    # [T] long, the target's prompt tokens (image placeholders already expanded)
    model_kwargs: extra forward arguments of the prefill (pixel_values, image_grid_thw, ...)
    image_mask:   # [T] bool, True at image-token positions
    """

    input_ids: Tensor
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    image_mask: Tensor | None = None

    def text_only_ids(self) -> Tensor:
        """The prompt with image positions removed, for drafts that cannot see images."""
        return self.input_ids if self.image_mask is None else self.input_ids[~self.image_mask]


@dataclass
class StepOutput:
    """logits: # [Q, V]; hidden: # [Q, H] last-layer features or None;
    inputs_embeds: # [Q, H] the language model's input embeddings (prefill only, when asked);
    attentions: # [Q, S] last layer's attention over all S cached positions, head-averaged, or None."""

    logits: Tensor
    hidden: Tensor | None = None
    inputs_embeds: Tensor | None = None
    attentions: Tensor | None = None


@runtime_checkable
class ModelAdapter(Protocol):
    """A causal (vision-)language model with its own KV cache, batch size 1.

    ``seq_len`` counts cached positions. ``forward`` appends Q positions:
      positions: # [Q] long, 1-D text positions (None: seq_len + 0..Q-1). An adapter whose model
                 uses other position schemes (Qwen2-VL M-RoPE) maps them itself, e.g. adding the
                 rope delta from prefill to all three sections.
      mask:      # [Q, seq_len + Q] bool, True where query i may attend key j (None: causal).
    ``keep`` then retains only ``start + indices`` among positions >= start; ``crop`` drops
    everything from ``length`` on. ``prefill`` resets the cache and returns logits for every
    prompt position (``hidden``/``embeds`` on request).
    """

    vocab_size: int
    seq_len: int

    def prefill(self, prompt: PromptInputs, *, hidden: bool = False,
                embeds: bool = False) -> StepOutput: ...

    def forward(self, tokens: Tensor, positions: Tensor | None = None,
                mask: Tensor | None = None, *, hidden: bool = False,
                attentions: bool = False) -> StepOutput: ...

    def keep(self, start: int, indices: Tensor) -> None: ...

    def crop(self, length: int) -> None: ...


@runtime_checkable
class Drafter(Protocol):
    """Proposes draft tokens for the core loop.

    Life of one request: ``begin`` once, then per step ``root`` (scores of the first draft
    token), any number of ``expand`` calls by a tree builder, and ``commit`` with what the
    target emitted. ``forwards`` counts the drafter's model forwards (0 for statistical drafts).

    root():   -> # [V] draft logits for the token after the root (the last committed token)
    expand(tokens [m], parents [m]) -> # [m, V] draft logits after each new node. Nodes are
              appended to this step's working tree; ``parents`` index earlier *expanded* nodes
              of this step (-1 = root).
    commit(tokens, hidden): the target emitted ``tokens`` (accepted drafts then the next root).
              ``hidden`` # [len(tokens), H] holds the target's last-layer feature at the
              position *before* each token, when ``needs_target_hidden``; else None.
    """

    name: str
    needs_target_hidden: bool
    forwards: int

    def begin(self, prompt: PromptInputs, target_prefill: StepOutput) -> None: ...

    def root(self) -> Tensor: ...

    def expand(self, tokens: Tensor, parents: Tensor) -> Tensor: ...

    def commit(self, tokens: list[int], hidden: Tensor | None) -> None: ...

"""A draft *model*: a small VLM that sees the image, or a text-only LM that does not.

The draft keeps its own KV cache through its adapter. Per step:
  root()    forwards the tokens the target emitted since the last step (causal) and returns the
            distribution after the last of them (the root);
  expand()  appends tree nodes to the cache with a tree mask (each node sees the committed
            prefix, its ancestors and itself) and returns their next-token logits;
  commit()  crops the working tree away and queues the emitted tokens for the next root().
Re-forwarding accepted tokens costs no extra forward: they ride along with the bonus token in
the next root() call, which any draft model has to make anyway.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..core.interfaces import ModelAdapter, PromptInputs, StepOutput


class ModelDrafter:
    needs_target_hidden = False

    def __init__(self, adapter: ModelAdapter, *, text_only: bool = False,
                 vocab_size: int | None = None, name: str | None = None):
        """``vocab_size``: the target's. A draft with a smaller vocabulary (e.g. 32000 against
        llava-hf's padded 32064) gets -inf logits on the padding ids; a larger one is an error."""
        if vocab_size is not None and adapter.vocab_size > vocab_size:
            raise ValueError(f"draft vocabulary ({adapter.vocab_size}) is larger than the "
                             f"target's ({vocab_size}): they cannot share token ids")
        self.adapter = adapter
        self.text_only = text_only
        self.vocab_size = vocab_size or adapter.vocab_size
        self.name = name or ("text_only_draft" if text_only else "draft_model")
        self.forwards = 0
        self._committed = 0              # cached positions that hold emitted tokens
        self._pending: list[int] = []    # emitted tokens not yet in the cache
        self._ancestors: list[list[int]] = []  # per expanded node: its ancestors and itself
        self._depths: list[int] = []
        self._device = torch.device("cpu")

    def begin(self, prompt: PromptInputs, target_prefill: StepOutput) -> None:
        if self.text_only:
            prompt = PromptInputs(prompt.text_only_ids())
        self._device = prompt.input_ids.device
        self.adapter.prefill(prompt)
        self.forwards += 1
        self._committed = self.adapter.seq_len
        self._pending = []
        self._reset_tree()

    def commit(self, tokens: list[int], hidden: Tensor | None) -> None:
        self.adapter.crop(self._committed)
        self._pending += tokens
        self._reset_tree()

    def root(self) -> Tensor:  # [V]
        if not self._pending:
            raise RuntimeError("root() needs the emitted tokens: call commit() first")
        dev = self._device
        out = self.adapter.forward(torch.tensor(self._pending, device=dev))
        self.forwards += 1
        self._committed = self.adapter.seq_len
        self._pending = []
        return self._pad(out.logits[-1])

    def expand(self, tokens: Tensor, parents: Tensor) -> Tensor:  # [m] , [m] -> [m, V]
        n0, m = len(self._depths), len(tokens)
        par = parents.tolist()
        chain = m == 1 and par[0] == n0 - 1 and n0 == (self._depths[-1] if n0 else 0)
        for i, p in enumerate(par):
            self._ancestors.append((self._ancestors[p] if p >= 0 else []) + [n0 + i])
            self._depths.append(self._depths[p] + 1 if p >= 0 else 1)
        dev = self._device
        if chain:  # the working tree is still one chain: plain causal attention
            out = self.adapter.forward(tokens.to(dev))
        else:
            base = self._committed
            mask = torch.zeros(m, base + n0 + m, dtype=torch.bool, device=dev)
            mask[:, :base] = True
            for i in range(m):
                mask[i, [base + a for a in self._ancestors[n0 + i]]] = True
            depths = torch.tensor(self._depths[n0:], device=dev)
            out = self.adapter.forward(tokens.to(dev), base - 1 + depths, mask)
        self.forwards += 1
        return self._pad(out.logits)

    def _reset_tree(self) -> None:
        self._ancestors, self._depths = [], []

    def _pad(self, logits: Tensor) -> Tensor:  # [..., V_draft] -> [..., V_target]
        extra = self.vocab_size - logits.shape[-1]
        if extra == 0:
            return logits
        pad = logits.new_full((*logits.shape[:-1], extra), float("-inf"))
        return torch.cat([logits, pad], dim=-1)

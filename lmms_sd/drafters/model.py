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
from ..core.working_tree import WorkingTree


class ModelDrafter:
    needs_target_hidden = False

    def __init__(self, adapter: ModelAdapter, *, text_only: bool = False,
                 vocab_size: int | None = None, name: str | None = None):
        """``vocab_size``: the target's logit rows. A draft with fewer rows (e.g. Vicuna's 32000
        against llava-hf's padded 32064) gets -inf logits on the missing ids; one with more
        (Qwen2-VL-7B's 152064 under 2B's 151936) has its extra rows dropped: they must be
        padding, which ``loading.check_same_vocab`` checks against the tokenizers."""
        tokenizer = getattr(adapter, "tokenizer", None)
        if vocab_size is not None and tokenizer is not None and len(tokenizer) > vocab_size:
            raise ValueError(f"the draft tokenizer ({len(tokenizer)} tokens) has ids beyond the "
                             f"target's {vocab_size} logit rows: they cannot share token ids")
        self.adapter = adapter
        self.text_only = text_only
        self.vocab_size = vocab_size or adapter.vocab_size
        self.name = name or ("text_only_draft" if text_only else "draft_model")
        self.forwards = 0
        self._committed = 0              # cached positions that hold emitted tokens
        self._pending: list[int] = []    # emitted tokens not yet in the cache
        self._tree = WorkingTree()               # this step's expanded nodes
        self._device = torch.device("cpu")

    def begin(self, prompt: PromptInputs, target_prefill: StepOutput) -> None:
        if self.text_only:
            prompt = PromptInputs(prompt.text_only_ids())
        self._device = prompt.input_ids.device
        self.adapter.prefill(prompt)
        self.forwards += 1
        self._committed = self.adapter.seq_len
        self._pending = []
        self._tree.reset()

    def commit(self, tokens: list[int], hidden: Tensor | None) -> None:
        self.adapter.crop(self._committed)
        self._pending += tokens
        self._tree.reset()

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
        chain = self._tree.extends_chain(parents)
        depths = self._tree.add(parents)
        dev = self._device
        if chain:  # the working tree is still one chain: plain causal attention
            out = self.adapter.forward(tokens.to(dev))
        else:
            base = self._committed
            mask = self._tree.mask(base, len(tokens), dev)
            out = self.adapter.forward(tokens.to(dev), base - 1 + depths.to(dev), mask)
        self.forwards += 1
        return self._pad(out.logits)

    def _pad(self, logits: Tensor) -> Tensor:  # [..., V_draft] -> [..., V_target]
        extra = self.vocab_size - logits.shape[-1]
        if extra <= 0:
            return logits[..., :self.vocab_size]
        pad = logits.new_full((*logits.shape[:-1], extra), float("-inf"))
        return torch.cat([logits, pad], dim=-1)

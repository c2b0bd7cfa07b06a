"""MSD drafter: an EAGLE-2 style feature head with modality decoupling (``MSDHead``).

The head has its own KV cache of *committed* slots (one per target token after the first,
see the glossary in ``msd_head``). Per request and step:
  begin(prompt, prefill)  queues slots 1..T-1 of the prompt: fc([embed(x_p) ; f_{p-1}]) at text
                          positions, the target's projected visual embedding e_p at image ones
  commit(tokens, hidden)  crops the working tree away and queues one slot per emitted token,
                          fused with the target's feature at the position before it
  root()                  forwards the queued slots (causal) and scores the token after the root
  expand(tokens, parents) appends draft slots fused with their parent's *predicted* feature;
                          a tree mask lets each see the committed slots, its ancestors, itself.
Accepted draft slots are recomputed at the next root() from the target's real features (as
EAGLE does); their predicted-feature cache entries are dropped.

Image attention (for the calibrated tree's visual-attention feature): with ``record_attention``
set, every forward also reads the head's last-layer attention and keeps in ``last_mass`` # [Q]
the mass each new query puts on the prompt's image slots (the thesis reads the draft head's own
attention). The drafter is then its own attention tap (``calibration.recording``).

Positions: Llama heads use target positions p. A Qwen2-VL head uses M-RoPE; with
``positions="target"`` it takes exactly the target's positions: the prompt's 3-D positions from
the target's rope index and p + rope_delta in all three sections after it. With
``positions="sequential"`` it uses p in all three sections, as MSD's released Qwen2-VL head was
trained and run (1-D positions). By default (``MSDConfig.positions=None``) a head runs with the
scheme it was trained with (``MSDHead.positions``, read from its config by ``msd_format``).
The draft positions never affect losslessness, only acceptance.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel

from ..core.interfaces import PromptInputs, StepOutput
from ..core.working_tree import WorkingTree
from .msd_head import MROPE_KINDS, POSITION_SCHEMES, MSDHead

# prompt -> (# [3, T] the target's M-RoPE prompt positions, rope delta for later text positions)
RopeIndex = Callable[[PromptInputs], tuple[Tensor, int]]


@dataclass(frozen=True)
class MSDConfig:
    """positions: ``target`` | ``sequential``, or None for the head's own (``MSDHead.positions``)."""

    positions: str | None = None
    name: str = "msd"

    def __post_init__(self) -> None:
        if self.positions is not None and self.positions not in POSITION_SCHEMES:
            raise ValueError(f"positions must be one of {POSITION_SCHEMES}, got {self.positions!r}")


def qwen2_vl_rope_index(model: PreTrainedModel) -> RopeIndex:
    """The target's own M-RoPE prompt positions, from ``model.model.get_rope_index`` (Qwen2-VL,
    Qwen2.5-VL and Qwen3-VL take the same arguments)."""

    def index(prompt: PromptInputs) -> tuple[Tensor, int]:
        ids = prompt.input_ids.reshape(1, -1)
        kw = prompt.model_kwargs
        if kw.get("image_grid_thw") is None and kw.get("video_grid_thw") is None:
            return torch.arange(ids.shape[1], device=ids.device).expand(3, -1), 0
        mask = kw.get("attention_mask")
        pos, delta = model.model.get_rope_index(
            ids, mm_token_type_ids=kw["mm_token_type_ids"].reshape(1, -1),
            image_grid_thw=kw.get("image_grid_thw"), video_grid_thw=kw.get("video_grid_thw"),
            attention_mask=None if mask is None else mask.reshape(1, -1))
        return pos[:, 0], int(delta.reshape(-1)[0])

    return index


class MSDDrafter:
    needs_target_hidden = True

    def __init__(self, head: MSDHead, cfg: MSDConfig = MSDConfig(),
                 rope_index: RopeIndex | None = None):
        self.positions = cfg.positions or head.positions
        self.mrope = head.kind in MROPE_KINDS and self.positions == "target"
        if self.mrope and rope_index is None:
            raise ValueError(f"a {head.kind} head with positions='target' needs the target's "
                             "rope index (e.g. qwen2_vl_rope_index(target_model))")
        self.head, self.cfg, self.rope_index = head, cfg, rope_index
        self.name = cfg.name
        self.forwards = 0
        self._cache = head.new_cache()
        self._committed = 0                     # cached committed slots; slot p at index p-1
        self._pending: list[Tensor] = []       # queued slot inputs, each # [k, H]
        self._prompt_pos: Tensor | None = None  # [3, T] the target's M-RoPE prompt positions
        self._delta = 0
        self._root_g: Tensor | None = None      # [H] the head's output at the root slot
        self._node_g: list[Tensor] = []         # per expanded node: # [H]
        self._tree = WorkingTree()                # this step's expanded nodes
        self.record_attention = False
        self.last_mass: Tensor | None = None        # [Q] image-attention mass per query
        self._image_slots = torch.zeros(0, dtype=torch.bool)  # [T-1] slot p at index p-1

    # ------------------------------------------------------------------ protocol
    @torch.no_grad()
    def begin(self, prompt: PromptInputs, target_prefill: StepOutput) -> None:
        ids = prompt.input_ids.reshape(-1)
        feats, embeds = target_prefill.hidden, target_prefill.inputs_embeds
        if feats is None or embeds is None:
            raise ValueError("MSD needs the target prefill's hidden states and input embeddings "
                             "(prefill(..., hidden=True, embeds=True))")
        width = getattr(self.head, "feature_width", embeds.shape[-1])  # EAGLE-3: 3H
        if feats.shape != (len(ids), width) or embeds.shape[0] != len(ids):
            raise ValueError(f"prefill hidden {tuple(feats.shape)} must be [{len(ids)}, {width}] "
                             f"and inputs_embeds {tuple(embeds.shape)} [{len(ids)}, H] (an "
                             "EAGLE-3 head needs its target states: bind_target_states)")
        image = prompt.image_mask
        if image is None:
            image = torch.zeros_like(ids, dtype=torch.bool)
        self._cache = self.head.new_cache()
        self._committed = 0
        self._reset_tree()
        self._root_g = None
        self._image_slots = image[1:].detach().cpu()
        if self.mrope:
            self._prompt_pos, self._delta = self.rope_index(prompt)
        self._pending = [self._prompt_slots(ids, feats, embeds, image)]

    @torch.no_grad()
    def commit(self, tokens: list[int], hidden: Tensor | None) -> None:
        if hidden is None or hidden.shape[0] != len(tokens):
            raise ValueError(f"commit needs one target feature per token ({len(tokens)}), got "
                             f"{None if hidden is None else tuple(hidden.shape)}")
        self._cache.crop(self._committed - self._cache.get_seq_length())
        dev = self.head.fc.weight.device
        u = self.head.fuse(torch.tensor(tokens, device=dev)[None], hidden[None].to(dev))
        self._pending.append(u[0])
        self._root_g = None  # the next root() computes it
        self._reset_tree()

    @torch.no_grad()
    def root(self) -> Tensor:  # [V]
        if not self._pending:
            raise RuntimeError("root() needs the emitted tokens: call commit() first")
        u = torch.cat(self._pending)  # [k, H]
        self._pending = []
        c, k = self._committed, len(u)
        mask = torch.ones(k, c + k, dtype=torch.bool, device=u.device).tril(c)
        slots = torch.arange(c + 1, c + k + 1, device=u.device)  # target positions of the slots
        g = self._forward(u, self._positions(slots), mask)
        self.forwards += 1
        self._root_g = g[-1]
        self._committed = c + k
        return self.head.logits(self._root_g)

    @torch.no_grad()
    def expand(self, tokens: Tensor, parents: Tensor) -> Tensor:  # [m], [m] -> [m, V]
        if self._root_g is None:
            raise RuntimeError("expand() needs root() first")
        c = self._committed
        depths = self._tree.add(parents)
        parent_g = torch.stack([self._root_g if p < 0 else self._node_g[p]
                                for p in parents.tolist()])  # [m, H]
        dev = parent_g.device
        mask = self._tree.mask(c, len(tokens), dev)
        depths = depths.to(dev)
        u = self.head.fuse(tokens.to(dev)[None], parent_g[None])
        g = self._forward(u[0], self._positions(c + depths), mask)
        self.forwards += 1
        self._node_g += list(g)
        return self.head.logits(g)

    # ------------------------------------------------------------------ helpers
    def _prompt_slots(self, ids: Tensor, feats: Tensor, embeds: Tensor,
                      image: Tensor) -> Tensor:
        """Inputs of prompt slots 1..T-1 (ids # [T], feats # [T, F], embeds # [T, H], image
        # [T] bool) -> # [T-1, U]."""
        dev = self.head.fc.weight.device
        u = self.head.fuse(ids[None, 1:].to(dev), feats[None, :-1].to(dev),
                           embeds[None, 1:].to(dev), image[None, 1:].to(dev))
        return u[0]

    def _forward(self, u: Tensor, positions: Tensor, mask: Tensor) -> Tensor:  # [Q, H] -> [Q, H]
        """The head over Q new slots (mask # [Q, K]); records ``last_mass`` when asked."""
        if not self.record_attention:
            return self.head(u[None], positions, mask[None], self._cache)[0]
        g, attn = self.head(u[None], positions, mask[None], self._cache, attentions=True)
        image = torch.zeros(attn.shape[-1], dtype=attn.dtype, device=attn.device)
        n = min(len(self._image_slots), len(image))
        image[:n] = self._image_slots[:n].to(image)
        self.last_mass = (attn[0] @ image).clamp(0.0, 1.0).cpu()
        return g[0]

    def _positions(self, slots: Tensor) -> Tensor:  # [Q] target positions -> head position ids
        if not self.mrope:
            return slots[None]  # [1, Q]
        prompt_len = self._prompt_pos.shape[1]
        text = (slots + self._delta).expand(3, -1)
        in_prompt = self._prompt_pos.to(slots.device)[:, slots.clamp(max=prompt_len - 1)]
        return torch.where(slots < prompt_len, in_prompt, text)[:, None]  # [3, 1, Q]

    def _reset_tree(self) -> None:
        self._node_g = []
        self._tree.reset()


def load_msd_drafter(source: str, target: PreTrainedModel, *, cfg: MSDConfig = MSDConfig(),
                     check_embeddings: bool = True, dtype: torch.dtype | None = None
                     ) -> MSDDrafter:
    """The head at ``source`` (folder or hub id, published layout) bound to the ``target`` HF
    model, with the target's M-RoPE index when the target uses M-RoPE (the Qwen-VL families)."""
    from .msd_format import load_msd_head  # deferred: the format module builds on this one

    head = load_msd_head(source, target, check_embeddings=check_embeddings, dtype=dtype)
    return MSDDrafter(head, cfg, qwen2_vl_rope_index(target) if head.kind in MROPE_KINDS
                      else None)

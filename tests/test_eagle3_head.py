"""The EAGLE-3 drafter on the tiny targets: the adapter's auxiliary states, the slot inputs,
drafting through the tree equals a fresh causal pass, modality decoupling."""
from __future__ import annotations

import copy

import pytest
import torch

from lmms_sd.adapters import HFAdapter
from lmms_sd.core.interfaces import PromptInputs
from lmms_sd.drafters.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Head, bind_target_states
from lmms_sd.drafters.eagle3_format import new_eagle3_head
from lmms_sd.drafters.msd import qwen2_vl_rope_index


def eagle3_target(adapter: HFAdapter, seed: int = 0) -> tuple[HFAdapter, Eagle3Head]:
    """A view of the shared tiny target that returns a new head's states (the shared adapter
    itself is left as it is), and the head (random, every other id in its vocabulary)."""
    torch.manual_seed(seed)
    view = copy.copy(adapter)
    head = new_eagle3_head(view.model, torch.arange(0, view.vocab_size, 2))
    bind_target_states(view, head)
    return view, head


def drafter(target: HFAdapter, head: Eagle3Head, **cfg) -> Eagle3Drafter:
    rope = qwen2_vl_rope_index(target.model) if head.kind == "qwen2_vl" else None
    return Eagle3Drafter(head, Eagle3Config(**cfg), rope)


def image_prompt(prompts: list[PromptInputs]) -> PromptInputs:
    return next(p for p in prompts if p.image_mask is not None and bool(p.image_mask.any()))


def test_hidden_layers_are_the_inputs_of_those_decoder_layers(target: HFAdapter,
                                                              prompts) -> None:
    view, head = eagle3_target(target)
    seen: dict[int, torch.Tensor] = {}
    def record(i: int):
        def hook(module, args, kwargs) -> None:
            seen[i] = (args[0] if args else kwargs["hidden_states"])[0]
        return hook

    hooks = [view.decoder.layers[i].register_forward_pre_hook(record(i), with_kwargs=True)
             for i in set(head.aux_layers)]
    try:
        out = view.prefill(prompts[0], hidden=True)
    finally:
        for h in hooks:
            h.remove()
    want = torch.cat([seen[i] for i in head.aux_layers], dim=-1)
    torch.testing.assert_close(out.hidden, want)
    assert target.prefill(prompts[0], hidden=True).hidden.shape[-1] == head.config.hidden_size


def test_draft_logits_live_on_the_draft_vocabulary_only(target: HFAdapter) -> None:
    _, head = eagle3_target(target)
    logits = head.logits(torch.randn(3, head.config.hidden_size))
    assert logits.shape == (3, target.vocab_size)
    assert torch.isinf(logits[:, 1::2]).all() and torch.isfinite(logits[:, 0::2]).all()


def test_tree_drafting_equals_a_fresh_causal_pass(target: HFAdapter, prompts) -> None:
    """root() then expand() along a path = the head run causally, without a cache, over the
    prompt slots, the root slot (target states) and the path slots (their parent's g)."""
    view, head = eagle3_target(target)
    prompt = prompts[0]
    pre = view.prefill(prompt, hidden=True, embeds=True)
    d = drafter(view, head)
    d.begin(prompt, pre)
    root = int(pre.logits[-1].argmax())
    d.commit([root], pre.hidden[-1:])
    first = d.root()
    t1 = int(first.argmax())
    second = d.expand(torch.tensor([t1]), torch.tensor([-1]))[0]
    ids = torch.cat([prompt.input_ids, torch.tensor([root])])
    feats = torch.cat([pre.hidden, pre.hidden[-1:]])
    u = head.fuse(ids[None, 1:], feats[None, :-1])[0]  # prompt slots + the root slot
    n = len(u)
    positions = d._positions(torch.arange(1, n + 1))
    g = head(u[None], positions, torch.ones(n, n, dtype=torch.bool).tril()[None])[0]
    torch.testing.assert_close(first, head.logits(g[-1]))
    u2 = torch.cat([u, head.fuse(torch.tensor([[t1]]), g[None, -1:])[0]])
    positions = d._positions(torch.arange(1, n + 2))
    g2 = head(u2[None], positions, torch.ones(n + 1, n + 1, dtype=torch.bool).tril()[None])[0]
    torch.testing.assert_close(second, head.logits(g2[-1]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decouple", [False, True])
def test_image_slots_read_the_visual_embedding_only_when_decoupled(decouple: bool,
                                                                   target: HFAdapter,
                                                                   prompts) -> None:
    view, head = eagle3_target(target)
    prompt = image_prompt(prompts)
    pre = view.prefill(prompt, hidden=True, embeds=True)
    slots = drafter(view, head, decouple_images=decouple)._prompt_slots(
        prompt.input_ids, pre.hidden, pre.inputs_embeds, prompt.image_mask)
    image = prompt.image_mask[1:]
    e = pre.inputs_embeds[1:][image]
    both = torch.cat([e, e], dim=-1)
    if decouple:
        torch.testing.assert_close(slots[image], both)
    else:
        plain = head.fuse(prompt.input_ids[None, 1:], pre.hidden[None, :-1])[0]
        torch.testing.assert_close(slots, plain)
        assert not torch.allclose(slots[image], both)


def test_begin_without_the_target_states_names_the_fix(target: HFAdapter, prompts) -> None:
    _, head = eagle3_target(target)
    pre = target.prefill(prompts[0], hidden=True, embeds=True)  # last-layer features only
    with pytest.raises(ValueError, match="bind_target_states"):
        drafter(target, head).begin(prompts[0], pre)


def test_a_head_for_a_deeper_target_is_refused(target: HFAdapter) -> None:
    _, head = eagle3_target(target)
    head.aux_layers = (2, 16, 29)
    with pytest.raises(ValueError, match="another target"):
        bind_target_states(copy.copy(target), head)

"""Adapters against plain Hugging Face forwards, table-driven over every family and all roles.

Each test states what it proves in one line. Tolerances: 1e-4 on logits (float32, different
kernels / batching), exact equality on greedy token sequences.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from lmms_sd.adapters import (HFAdapter, Qwen2VLAdapter, check_same_vocab, extend_prompt,
                              load_adapter)
from lmms_sd.core.generate import GenerationConfig, generate
from lmms_sd.core.interfaces import ModelAdapter, PromptInputs
from lmms_sd.core.kv import kv_crop, kv_keep
from lmms_sd.core.tree import DraftTree
from lmms_sd.testing.tiny import FAMILIES, ROLES, tiny_image

ATOL = 1e-4
TREE_PARENTS = [-1, -1, 0, 0, 1, 2, 2, 4, 7]  # branches at the root and below, depth up to 5


def hf_logits(adapter: HFAdapter, prompt: PromptInputs) -> torch.Tensor:  # [T, V]
    """Logits of the wrapped model's own forward over the whole prompt."""
    if adapter.family == "causal_lm":
        return adapter.model(input_ids=prompt.text_only_ids()[None]).logits[0]
    return adapter.model(input_ids=prompt.input_ids[None], **prompt.model_kwargs).logits[0]


def random_tree(vocab: int, seed: int) -> DraftTree:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (len(TREE_PARENTS),), generator=gen)
    return DraftTree(tokens, torch.tensor(TREE_PARENTS))


def tree_forward(adapter: HFAdapter, root: int, tree: DraftTree) -> torch.Tensor:  # [N+1, V]
    start = adapter.seq_len
    slots = torch.cat([torch.tensor([root]), tree.tokens])
    return adapter.forward(slots, start + tree.slot_depths(), tree.attention_mask(start)).logits


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """Every family here (the suite's ``family`` covers the two original ones)."""
    return request.param


@pytest.fixture()
def target(every_tiny_adapters: dict[str, dict[str, HFAdapter]], family: str) -> HFAdapter:
    return every_tiny_adapters[family]["target"]


@pytest.fixture()
def text_only(every_tiny_adapters: dict[str, dict[str, HFAdapter]], family: str) -> HFAdapter:
    return every_tiny_adapters[family]["text_only"]


@pytest.fixture(params=ROLES)
def adapter(every_tiny_adapters: dict[str, dict[str, HFAdapter]], family: str,
            request: pytest.FixtureRequest) -> HFAdapter:
    return every_tiny_adapters[family][request.param]


def test_adapters_satisfy_the_protocol(adapter: HFAdapter) -> None:
    # every loaded adapter is a ModelAdapter with the lm_head's vocabulary size
    assert isinstance(adapter, ModelAdapter)
    assert adapter.vocab_size == adapter.model.get_output_embeddings().weight.shape[0]


def test_prefill_matches_hf_forward(adapter: HFAdapter, prompts: list[PromptInputs]) -> None:
    # prefill logits at every prompt position equal the model's own forward; the cache fills up
    for prompt in prompts:
        out = adapter.prefill(prompt)
        expected = hf_logits(adapter, prompt)
        assert out.logits.shape == expected.shape
        torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=0)
        assert adapter.seq_len == len(expected)


def test_prefill_hidden_is_the_lm_head_input(target: HFAdapter,
                                             prompts: list[PromptInputs]) -> None:
    # hidden = the decoder's final (normed) state, the lm_head's input, as EAGLE/MSD heads read it
    prompt = prompts[0]
    out = target.prefill(prompt, hidden=True)
    ref = target.model.model(input_ids=prompt.input_ids[None], **prompt.model_kwargs)
    torch.testing.assert_close(out.hidden, ref.last_hidden_state[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(target.lm_head(out.hidden), out.logits, atol=ATOL, rtol=0)


def test_prefill_embeds_merge_image_features(target: HFAdapter,
                                             prompts: list[PromptInputs]) -> None:
    # embeds = token embeddings at text positions, projected image features at image positions
    for prompt in prompts:
        emb = target.prefill(prompt, embeds=True).inputs_embeds
        text = ~prompt.image_mask
        torch.testing.assert_close(emb[text], target.embed_tokens(prompt.input_ids[text]))
        if prompt.image_mask.any():
            kw = prompt.model_kwargs
            extra = [kw[k] for k in ("image_grid_thw", "image_sizes") if k in kw]
            feats = target.model.get_image_features(kw["pixel_values"], *extra).pooler_output
            torch.testing.assert_close(emb[prompt.image_mask], torch.cat(list(feats)))


def test_tree_forward_matches_each_path_as_a_chain(adapter: HFAdapter,
                                                   prompts: list[PromptInputs]) -> None:
    # one tree-masked forward gives, on every root-to-leaf path, the logits of that path fed as
    # a plain causal chain
    for i, prompt in enumerate(prompts[:3]):
        pre = adapter.prefill(prompt)
        root, start = int(pre.logits[-1].argmax()), adapter.seq_len
        tree = random_tree(adapter.vocab_size, seed=i)
        logits = tree_forward(adapter, root, tree)
        assert adapter.seq_len == start + len(tree) + 1
        for path in tree.paths:
            adapter.crop(start)
            chain = adapter.forward(torch.cat([torch.tensor([root]), tree.tokens[path]])).logits
            rows = torch.tensor([0] + [n + 1 for n in path])
            torch.testing.assert_close(logits[rows], chain, atol=ATOL, rtol=0)


def test_keep_equals_fresh_prefill_of_the_accepted_sequence(adapter: HFAdapter,
                                                            prompts: list[PromptInputs]) -> None:
    # KV invariance: tree forward + keep(root, path) leaves exactly the cache that a fresh prefill
    # of prompt + root + path builds (keys carry the positions, so this checks them too)
    prompt = prompts[2]
    tree = random_tree(adapter.vocab_size, seed=7)
    for path in tree.paths:
        pre = adapter.prefill(prompt)
        root, start = int(pre.logits[-1].argmax()), adapter.seq_len
        tree_forward(adapter, root, tree)
        adapter.keep(start, torch.tensor([0] + [n + 1 for n in path]))
        kept = [(layer.keys.clone(), layer.values.clone()) for layer in adapter.cache.layers]
        accepted = torch.cat([torch.tensor([root]), tree.tokens[path]])
        adapter.prefill(extend_prompt(prompt, accepted))
        assert adapter.seq_len == kept[0][0].shape[-2]
        for (keys, values), layer in zip(kept, adapter.cache.layers):
            torch.testing.assert_close(keys, layer.keys, atol=ATOL, rtol=0)
            torch.testing.assert_close(values, layer.values, atol=ATOL, rtol=0)


def test_incremental_decode_matches_hf(target: HFAdapter, prompts: list[PromptInputs]) -> None:
    # token-by-token greedy decode equals model.generate, and every step's logits equal the
    # model's own forward over the whole sequence (this is where M-RoPE positions go wrong)
    n = 24
    for prompt in prompts:
        logits = [target.prefill(prompt).logits[-1]]
        tokens: list[int] = []
        while len(tokens) < n and (not tokens or tokens[-1] not in target.eos_token_ids):
            tokens.append(int(logits[-1].argmax()))
            logits.append(target.forward(torch.tensor([tokens[-1]])).logits[-1])
        assert tokens == target.hf_generate(prompt, n)
        assert len(tokens) >= 20, "a weak test: the model stopped early"
        full = hf_logits(target, extend_prompt(prompt, torch.tensor(tokens)))
        T = len(prompt.input_ids)
        torch.testing.assert_close(torch.stack(logits), full[T - 1:], atol=ATOL, rtol=0)


def test_qwen2_vl_rope_delta_matters(tiny_paths: dict[str, dict[str, Path]]) -> None:
    # the decode test above can fail: image prompts have a non-zero rope delta, and decoding
    # without it gives different logits than the model's own forward (own adapter: we break it)
    target = load_adapter(tiny_paths["qwen2_vl"]["target"])
    assert isinstance(target, Qwen2VLAdapter)
    prompt = target.prepare("What is in the image?", [tiny_image(0)])
    pre = target.prefill(prompt)
    assert target.rope_delta < 0
    token = int(pre.logits[-1].argmax())
    full = hf_logits(target, extend_prompt(prompt, torch.tensor([token])))
    right = target.forward(torch.tensor([token])).logits[-1]
    torch.testing.assert_close(right, full[-1], atol=ATOL, rtol=0)
    target.crop(len(prompt.input_ids))
    target.rope_delta = 0
    wrong = target.forward(torch.tensor([token])).logits[-1]
    assert (wrong - full[-1]).abs().max() > 100 * ATOL


def test_crop_then_reforward(adapter: HFAdapter, prompts: list[PromptInputs]) -> None:
    # cropping the last positions and feeding them again reproduces their logits
    adapter.prefill(prompts[0])
    tokens = torch.tensor([5, 17, 33, 70, 9])
    first = adapter.forward(tokens).logits
    adapter.crop(adapter.seq_len - 3)
    again = adapter.forward(tokens[2:]).logits
    torch.testing.assert_close(again, first[2:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("fam", FAMILIES)
def test_attentions_need_eager_and_are_head_averaged(
        every_tiny_paths: dict[str, dict[str, Path]],
        every_tiny_adapters: dict[str, dict[str, HFAdapter]], fam: str) -> None:
    # eager attention rows are distributions over the unmasked positions; logits agree with SDPA
    sdpa = every_tiny_adapters[fam]["target"]
    eager = load_adapter(every_tiny_paths[fam]["target"], attn_implementation="eager")
    prompt = eager.prepare("What is in the image?", [tiny_image(4)])
    tree = random_tree(eager.vocab_size, seed=3)
    results = []
    for a in (eager, sdpa):
        a.prefill(prompt)
        start = a.seq_len
        mask = tree.attention_mask(start)
        slots = torch.cat([torch.tensor([1]), tree.tokens])
        results.append(a.forward(slots, start + tree.slot_depths(), mask,
                                 attentions=a is eager))
    attn = results[0].attentions
    assert attn.shape == mask.shape
    torch.testing.assert_close(attn.sum(-1), torch.ones(len(mask)))
    assert float(attn[~mask].abs().max()) == 0.0
    torch.testing.assert_close(results[0].logits, results[1].logits, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="eager"):
        sdpa.forward(torch.tensor([1]), attentions=True)


def test_text_only_draft_prefills_without_images(text_only: HFAdapter,
                                                 prompts: list[PromptInputs]) -> None:
    # a text-only draft under a VLM target sees the prompt minus its image placeholders
    for prompt in prompts:
        text_only.prefill(prompt)
        assert text_only.seq_len == len(prompt.input_ids) - int(prompt.image_mask.sum())


def test_generate_without_drafter_is_hf_greedy(target: HFAdapter,
                                               prompts: list[PromptInputs]) -> None:
    # the core loop's autoregressive path (drafter=None) emits model.generate's greedy tokens
    n = 24
    for prompt in prompts:
        cfg = GenerationConfig(max_new_tokens=n, eos_token_ids=target.eos_token_ids)
        result = generate(target, prompt, cfg)
        assert result.tokens == target.hf_generate(prompt, n)
        assert result.stats.target_forwards == len(result.tokens)


def test_kv_keep_and_crop_select_positions() -> None:
    # on a hand-built cache whose entries encode their position: keep = prefix + start + indices,
    # crop = prefix, for every layer and both keys and values; a keep after a crop still works
    cache = DynamicCache()
    for layer in range(2):
        pos = torch.arange(10.0).view(1, 1, 10, 1).expand(1, 2, 10, 3)  # [B, H, S, D]
        cache.update(pos + 100 * layer, -pos, layer)
    kv_keep(cache, 3, torch.tensor([0, 2, 5]))
    for i, layer in enumerate(cache.layers):
        assert layer.keys[0, 1, :, 0].tolist() == [100 * i + p for p in (0, 1, 2, 3, 5, 8)]
        assert layer.values[0, 0, :, 2].tolist() == [-p for p in (0, 1, 2, 3, 5, 8)]
    kv_crop(cache, 4)
    kv_keep(cache, 1, torch.tensor([2]))
    assert cache.get_seq_length() == 2
    assert cache.layers[1].keys[0, 0, :, 0].tolist() == [100.0, 103.0]


# ---------------------------------------------------------------------------- errors

def test_load_adapter_errors(tmp_path: Path) -> None:
    # a missing directory, an unknown model type and a bad role are named in the error
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_adapter(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ValueError, match="clip_vision_model"):
        load_adapter(tmp_path)
    with pytest.raises(ValueError, match="referee"):
        load_adapter(tmp_path, role="referee")


def test_check_same_vocab(tiny_adapters: dict[str, dict[str, HFAdapter]]) -> None:
    # drafts of one family share the target's vocabulary; across families they do not
    for fam in tiny_adapters:
        for role in ("draft_vlm", "text_only"):
            check_same_vocab(tiny_adapters[fam]["target"], tiny_adapters[fam][role])
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_vocab(tiny_adapters["llava"]["target"], tiny_adapters["qwen2_vl"]["text_only"])


def test_forward_and_cache_errors(target: HFAdapter, prompts: list[PromptInputs]) -> None:
    # shapes and ranges that do not fit the cache are refused with the offending values
    target.prefill(prompts[0])
    n = target.seq_len
    with pytest.raises(ValueError, match="mask"):
        target.forward(torch.tensor([1, 2]), mask=torch.ones(2, n, dtype=torch.bool))
    with pytest.raises(ValueError, match="positions"):
        target.forward(torch.tensor([1, 2]), positions=torch.tensor([n]))
    with pytest.raises(ValueError, match="crop"):
        target.crop(n + 1)
    with pytest.raises(ValueError, match="keep"):
        target.keep(n - 2, torch.tensor([0, 2]))
    assert target.seq_len == n

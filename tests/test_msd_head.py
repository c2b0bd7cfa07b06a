"""MSD head and drafter on tiny hand-built configs: layout, input fusion, modality decoupling,
cache bookkeeping (tree = paths, commit = fresh recompute) and positions (Llama 1-D, M-RoPE)."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from transformers import LlamaConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig

from lmms_sd.core.interfaces import Drafter, PromptInputs, StepOutput
from lmms_sd.drafters.msd import MSDConfig, MSDDrafter
from lmms_sd.drafters.msd_head import MSDHead

V, H = 40, 32
IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "vocab_size": V}


def make_head(kind: str, seed: int = 0, vocab_limit: int | None = None) -> MSDHead:
    torch.manual_seed(seed)
    shape = dict(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, **IDS)
    if kind == "llama":
        cfg = LlamaConfig(**shape)
    else:  # head_dim 8 -> 4 rotary frequencies split over (t, h, w)
        cfg = Qwen2VLTextConfig(**shape, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    embed, lm_head = nn.Embedding(V, H), nn.Linear(H, V, bias=False)
    head = MSDHead(cfg, embed, lm_head, vocab_limit=vocab_limit)
    for p in head.parameters():  # larger than nn.Linear's default so positions matter
        nn.init.normal_(p, std=0.3)
    return head.eval()


# An 8-token prompt whose positions 3..5 are image tokens.
PROMPT_IDS = torch.tensor([1, 7, 9, 3, 3, 3, 11, 13])
IMAGE = torch.tensor([False, False, False, True, True, True, False, False])


def prompt_and_prefill(seed: int = 1) -> tuple[PromptInputs, StepOutput]:
    g = torch.Generator().manual_seed(seed)
    t = len(PROMPT_IDS)
    pre = StepOutput(logits=torch.zeros(t, V), hidden=torch.randn(t, H, generator=g),
                     inputs_embeds=torch.randn(t, H, generator=g))
    return PromptInputs(PROMPT_IDS, image_mask=IMAGE), pre


def started(head: MSDHead, root: int = 5, **kw) -> tuple[MSDDrafter, Tensor, StepOutput]:
    """A drafter after begin, the first commit (the root) and root(): (drafter, logits, prefill)."""
    prompt, pre = prompt_and_prefill()
    d = MSDDrafter(head, **kw)
    d.begin(prompt, pre)
    d.commit([root], pre.hidden[-1:])
    return d, d.root(), pre


def slot_inputs(head: MSDHead, tokens: list[int], feats: Tensor, pre: StepOutput) -> Tensor:
    """Every slot's input from scratch: prompt slots 1..T-1 (visual embeddings at image
    positions), then one (token, target feature) pair per token. # [1, n, H]"""
    ids = torch.cat([PROMPT_IDS[1:], torch.tensor(tokens)])[None]
    f = torch.cat([pre.hidden[:-1], feats])[None]
    vis = torch.cat([pre.inputs_embeds[1:], torch.zeros(len(tokens), H)])[None]
    img = torch.cat([IMAGE[1:], torch.zeros(len(tokens), dtype=torch.bool)])[None]
    with torch.no_grad():
        return head.fuse(ids, f, vis, img)


def causal(head: MSDHead, u: Tensor, positions: Tensor | None = None) -> Tensor:
    """One causal forward without a cache; positions default to slot p at position p."""
    n = u.shape[1]
    pos = torch.arange(1, n + 1)[None] if positions is None else positions
    with torch.no_grad():
        return head(u, pos, torch.ones(n, n, dtype=torch.bool).tril()[None])


def reference_logits(head: MSDHead, tokens: list[int], feats: Tensor, pre: StepOutput,
                     positions: Tensor | None = None) -> Tensor:  # [V] after the last slot
    return head.logits(causal(head, slot_inputs(head, tokens, feats, pre), positions)[0, -1])


# ---------------------------------------------------------------------------- the module

PUBLISHED_KEYS = {  # the state dict of cnets.Model minus embed_tokens (see msd_format)
    "llama": ["fc.weight", "fc.bias", "layers.0.self_attn.q_proj.weight",
              "layers.0.self_attn.k_proj.weight", "layers.0.self_attn.v_proj.weight",
              "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_proj.weight",
              "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight",
              "layers.0.post_attention_layernorm.weight"],
    "qwen2_vl": ["fc.weight", "fc.bias", "layers.0.self_attn.q_proj.weight",
                 "layers.0.self_attn.q_proj.bias", "layers.0.self_attn.k_proj.weight",
                 "layers.0.self_attn.k_proj.bias", "layers.0.self_attn.v_proj.weight",
                 "layers.0.self_attn.v_proj.bias", "layers.0.self_attn.o_proj.weight",
                 "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight",
                 "layers.0.mlp.down_proj.weight", "layers.0.input_layernorm.weight",
                 "layers.0.post_attention_layernorm.weight"],
}


@pytest.mark.parametrize("kind", ["llama", "qwen2_vl"])
def test_state_dict_keys_are_the_published_ones(kind: str) -> None:
    # The Llama head's first layer has no input_layernorm; the Qwen2-VL one keeps it.
    assert sorted(make_head(kind).state_dict()) == sorted(PUBLISHED_KEYS[kind])


def test_target_modules_are_shared_not_copied_or_owned() -> None:
    head = make_head("llama")
    embed, lm_head = head.target.embed_tokens, head.target.lm_head
    assert not any(p is embed.weight or p is lm_head.weight for p in head.parameters())
    head.to(torch.float64)  # moving the head must not convert the target's modules
    assert embed.weight.dtype == torch.float32 and head.fc.weight.dtype == torch.float64
    head.to(torch.float32)
    feats = torch.randn(1, 3, H)
    before = head.logits(feats)
    with torch.no_grad():
        lm_head.weight.mul_(2)  # the head sees the target's weights live
    assert torch.allclose(head.logits(feats), 2 * before, atol=1e-5)


def test_fuse_concatenates_token_embedding_first_then_feature() -> None:
    head = make_head("llama")
    tokens, feats = torch.tensor([[4, 5, 6]]), torch.randn(1, 3, H)
    eye, zero = torch.eye(H), torch.zeros(H, H)
    with torch.no_grad():
        head.fc.bias.zero_()
        head.fc.weight.copy_(torch.cat([eye, zero], dim=1))  # picks the first half
        assert torch.equal(head.fuse(tokens, feats), head.target.embed_tokens(tokens))
        head.fc.weight.copy_(torch.cat([zero, eye], dim=1))  # picks the second half
        assert torch.equal(head.fuse(tokens, feats), feats)


def test_fuse_uses_the_visual_embedding_itself_at_image_positions() -> None:
    head = make_head("llama")
    tokens, feats, visual = torch.tensor([[4, 5, 6]]), torch.randn(1, 3, H), torch.randn(1, 3, H)
    is_visual = torch.tensor([[False, True, False]])
    with torch.no_grad():
        u = head.fuse(tokens, feats, visual, is_visual)
        plain = head.fuse(tokens, feats)
    assert torch.equal(u[0, 1], visual[0, 1])
    assert torch.equal(u[0, [0, 2]], plain[0, [0, 2]])


@pytest.mark.parametrize("kind", ["llama", "qwen2_vl"])
def test_cached_forward_equals_one_full_forward(kind: str) -> None:
    head = make_head(kind)
    u, n = torch.randn(1, 7, H), 7
    pos = torch.arange(n)[None]
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None]
    with torch.no_grad():
        full = head(u, pos, mask)
        cache = head.new_cache()
        parts = [head(u[:, a:b], pos[:, a:b], mask[:, a:b, :b], cache) for a, b in ((0, 4), (4, 7))]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_vocab_limit_masks_ids_the_head_never_saw() -> None:
    head = make_head("llama", vocab_limit=32)
    logits = head.logits(torch.randn(2, H))
    assert torch.isinf(logits[:, 32:]).all() and torch.isfinite(logits[:, :32]).all()


# ---------------------------------------------------------------------------- the drafter

def test_drafter_follows_the_protocol() -> None:
    d = MSDDrafter(make_head("llama"))
    assert isinstance(d, Drafter) and d.needs_target_hidden


@pytest.mark.parametrize("kind", ["llama", "qwen2_vl"])
def test_tree_expansion_equals_each_path_drafted_alone(kind: str) -> None:
    # A tree expanded in three calls must score every node exactly as a chain along its path.
    head = make_head(kind)
    kw = {} if kind == "llama" else {"cfg": MSDConfig(positions="sequential")}
    d, _, _ = started(head, **kw)
    tokens, parents = [11, 12, 13, 14, 15], [-1, -1, 0, 0, 2]
    logits = torch.cat([d.expand(torch.tensor(tokens[a:b]), torch.tensor(parents[a:b]))
                        for a, b in ((0, 2), (2, 4), (4, 5))])
    assert d.forwards == 4
    for node in range(len(tokens)):
        path = [node]
        while parents[path[0]] >= 0:
            path.insert(0, parents[path[0]])
        chain, _, _ = started(head, **kw)
        for depth, i in enumerate(path):
            out = chain.expand(torch.tensor([tokens[i]]), torch.tensor([depth - 1]))[0]
        assert torch.allclose(out, logits[node], atol=1e-4), f"node {node}"


def test_commit_recomputes_accepted_slots_from_target_features() -> None:
    # After drafting a tree and committing 3 tokens, the next root must equal a from-scratch
    # forward over all slots with the *target's* features (the cache holds no draft leftovers).
    head = make_head("llama")
    d, first, pre = started(head, root=5)
    assert torch.allclose(first, reference_logits(head, [5], pre.hidden[-1:], pre), atol=1e-5)
    d.expand(torch.tensor([20, 21]), torch.tensor([-1, -1]))
    d.expand(torch.tensor([22]), torch.tensor([0]))
    feats = torch.randn(3, H)
    d.commit([20, 22, 8], feats)
    got = d.root()
    want = reference_logits(head, [5, 20, 22, 8], torch.cat([pre.hidden[-1:], feats]), pre)
    assert torch.allclose(got, want, atol=1e-5)


def test_image_slots_read_the_visual_embedding_not_the_feature() -> None:
    head = make_head("llama")
    base = started(head)[1]

    def root_after(edit) -> Tensor:
        prompt, p2 = prompt_and_prefill()
        edit(p2)
        d = MSDDrafter(head)
        d.begin(prompt, p2)
        d.commit([5], p2.hidden[-1:])
        return d.root()

    def bump(field: str, pos: int):
        return lambda p: getattr(p, field)[pos].add_(1.0)

    # image slot 4: its feature f_3 is ignored, its visual embedding e_4 is used
    assert torch.equal(root_after(bump("hidden", 3)), base)
    assert not torch.allclose(root_after(bump("inputs_embeds", 4)), base)
    # text slot 7: its feature f_6 is used; the target's inputs_embeds there are not (embed_tokens is)
    assert not torch.allclose(root_after(bump("hidden", 6)), base)
    assert torch.equal(root_after(bump("inputs_embeds", 7)), base)


def test_mrope_positions_follow_the_target_rope_index() -> None:
    # Prompt positions come from the rope index (image tokens on a 2-D grid), later ones are
    # p + delta in all three sections; checked against a hand-built from-scratch forward.
    head = make_head("qwen2_vl")
    t = len(PROMPT_IDS)
    grid = torch.tensor([[0, 1, 2, 3, 3, 3, 4, 5],    # temporal
                         [0, 1, 2, 3, 4, 4, 5, 6],    # height
                         [0, 1, 2, 3, 3, 4, 5, 6]])   # width
    delta = 6 + 1 - t  # max position + 1 - T, as Qwen2-VL defines it
    d, _, pre = started(head, root=5, rope_index=lambda prompt: (grid, delta))
    feats = torch.randn(2, H)
    d.commit([20, 21], feats)
    got = d.root()
    chain = d.expand(torch.tensor([30]), torch.tensor([-1]))[0]

    slots = torch.arange(1, t + 3)  # prompt slots 1..T-1, then the root and 2 emitted tokens
    pos = torch.where(slots < t, grid[:, slots.clamp(max=t - 1)], (slots + delta).expand(3, -1))
    toks, f = [5, 20, 21], torch.cat([pre.hidden[-1:], feats])
    assert torch.allclose(got, reference_logits(head, toks, f, pre, pos[:, None]), atol=1e-4)
    sequential = reference_logits(head, toks, f, pre, slots[None])
    assert not torch.allclose(got, sequential, atol=1e-3)  # the index really changed positions

    # the root's child sits at position (T + 2) + 1 + delta and sees every committed slot
    u = slot_inputs(head, toks, f, pre)
    g = causal(head, u, pos[:, None])
    with torch.no_grad():
        u_child = head.fuse(torch.tensor([[30]]), g[:, -1:])
    child_pos = torch.cat([pos, torch.full((3, 1), t + 3 + delta)], 1)[:, None]
    want = head.logits(causal(head, torch.cat([u, u_child], 1), child_pos)[0, -1])
    assert torch.allclose(chain, want, atol=1e-4)


def test_sequential_positions_need_no_rope_index_and_target_positions_do() -> None:
    head = make_head("qwen2_vl")
    with pytest.raises(ValueError, match="rope index"):
        MSDDrafter(head)
    _, got, pre = started(head, cfg=MSDConfig(positions="sequential"))
    assert torch.allclose(got, reference_logits(head, [5], pre.hidden[-1:], pre), atol=1e-4)
    with pytest.raises(ValueError, match="positions"):
        MSDConfig(positions="absolute")


def test_begin_without_target_features_is_an_error() -> None:
    prompt, pre = prompt_and_prefill()
    d = MSDDrafter(make_head("llama"))
    with pytest.raises(ValueError, match="hidden"):
        d.begin(prompt, StepOutput(pre.logits, hidden=pre.hidden))
    d.begin(prompt, pre)
    d.root()  # forwards the prompt's slots
    with pytest.raises(RuntimeError, match="commit"):
        d.root()  # nothing new was committed


# ---------------------------------------------------------------------------- end to end

E2E_TREES = [  # (builder, settings): MSD's default tree is dynamic (depth 5, top_k 10, 59 nodes)
    ("chain", {"k": 4}),
    ("dynamic", {"depth": 4, "top_k": 3, "total_tokens": 10}),
    ("opt", {"nodes": 8, "threshold": 0.1, "max_depth": 4}),
    ("static", {"acceptance": "0.6,0.3,0.1", "budget": 10, "max_depth": 4}),
]
MAX_NEW = 16


@pytest.fixture(scope="module")
def msd_references(tiny_adapters) -> dict[str, list[tuple[PromptInputs, list[int]]]]:
    """Per family: every conftest prompt with the target's own greedy output (HF generate)."""
    from conftest import PROMPT_SPECS

    refs = {}
    for family, adapters in tiny_adapters.items():
        target = adapters["target"]
        refs[family] = []
        for text, images in PROMPT_SPECS:
            prompt = target.prepare(text, images)
            refs[family].append((prompt, target.hf_generate(prompt, MAX_NEW)))
    return refs


@pytest.mark.parametrize("tree, settings", E2E_TREES, ids=[t for t, _ in E2E_TREES])
def test_greedy_with_a_random_msd_head_equals_target_generate(tree: str, settings: dict, family: str,
                                                             tiny_adapters, msd_references) -> None:
    from lmms_sd.core.generate import GenerationConfig, generate
    from lmms_sd.drafters.msd import qwen2_vl_rope_index
    from lmms_sd.drafters.msd_format import new_msd_head
    from lmms_sd.trees import make_builder

    target = tiny_adapters[family]["target"]
    torch.manual_seed(0)
    head = new_msd_head(target.model)
    rope_index = qwen2_vl_rope_index(target.model) if family == "qwen2_vl" else None
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=target.eos_token_ids)
    for prompt, reference in msd_references[family]:
        drafter = MSDDrafter(head, rope_index=rope_index)
        result = generate(target, prompt, cfg, drafter, make_builder(tree, **settings),
                          decode=target.decode)
        assert result.tokens == reference
        drafting_steps = sum(1 for s in result.stats.steps if s.tree_size)  # not a last
        assert result.stats.draft_forwards >= drafting_steps > 0  # step with one token left


def test_rope_index_agrees_with_the_target_adapter(tiny_adapters) -> None:
    # The drafter's M-RoPE prompt positions come from the same get_rope_index as the target's.
    from conftest import PROMPT_SPECS

    from lmms_sd.drafters.msd import qwen2_vl_rope_index

    target = tiny_adapters["qwen2_vl"]["target"]
    index = qwen2_vl_rope_index(target.model)
    deltas = []
    for text, images in PROMPT_SPECS:
        prompt = target.prepare(text, images)
        target.prefill(prompt)
        positions, delta = index(prompt)
        assert positions.shape == (3, len(prompt.input_ids))
        assert delta == target.rope_delta
        deltas.append(delta)
    assert min(deltas) < 0 and max(deltas) == 0  # images shorten the positions, text does not


# ---------------------------------------------------------------------------- image attention

@pytest.mark.parametrize("kind", ["llama", "qwen2_vl"])
def test_recorded_image_attention_matches_a_fresh_causal_pass(kind: str) -> None:
    # the root's queries see the prompt slots; their image mass equals the attention of one
    # cache-free causal pass over the same slots, summed over the image slots 3..5
    head = make_head(kind)
    cfg = MSDConfig(positions="sequential") if kind == "qwen2_vl" else MSDConfig()
    prompt, pre = prompt_and_prefill()
    d = MSDDrafter(head, cfg)
    d.record_attention = True
    d.begin(prompt, pre)
    d.commit([5], pre.hidden[-1:])
    logits = d.root()
    u = slot_inputs(head, [5], pre.hidden[-1:], pre)
    n = u.shape[1]
    with torch.no_grad():
        g, attn = head(u, torch.arange(1, n + 1)[None], torch.ones(n, n, dtype=torch.bool).tril()[None],
                       attentions=True)
    assert torch.allclose(attn[0].sum(-1), torch.ones(n), atol=1e-5)
    assert float(attn[0].triu(1).abs().max()) == 0.0  # masked keys get no weight
    assert torch.allclose(head.logits(g[0, -1]), logits, atol=1e-4)  # eager == sdpa output
    image_slots = torch.cat([IMAGE[1:], torch.tensor([False])]).float()
    assert torch.allclose(d.last_mass, attn[0] @ image_slots, atol=1e-5)
    assert float(d.last_mass[-1]) > 0
    d.expand(torch.tensor([6, 7]), torch.tensor([-1, -1]))
    assert d.last_mass.shape == (2,) and bool(((d.last_mass > 0) & (d.last_mass <= 1)).all())

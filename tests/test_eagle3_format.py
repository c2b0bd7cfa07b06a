"""EAGLE-3 checkpoints: heads written by hand in the published layout (SpecForge / EAGLE-3 key
names, independent of our module) load and compute what the layout means; saving writes that
layout; heads that do not fit the target are clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, PreTrainedModel, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration)

from lmms_sd.drafters.eagle3_format import load_eagle3_head, new_eagle3_head, save_eagle3_head

V, H, INTER, HEADS, KV, LAYERS = 48, 32, 64, 4, 2, 6
SECTION = [2, 1, 1]
DRAFT_IDS = torch.tensor([0, 1, 2, 5, 7, 11, 20, 30, 40, 45])  # a reduced draft vocabulary


def tiny_target(kind: str) -> PreTrainedModel:
    torch.manual_seed(0)
    text = {"hidden_size": H, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": KV, "vocab_size": V,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if kind == "llama":
        vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, image_size=16, patch_size=8)
        cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**text),
                          image_token_index=V - 1, image_seq_length=4)
        return LlavaForConditionalGeneration(cfg).eval()
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                               "mrope_section": SECTION}
    vision = {"depth": 1, "embed_dim": 16, "hidden_size": H, "num_heads": 2, "mlp_ratio": 2,
              "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=V - 1,
                        video_token_id=V - 2, vision_start_token_id=V - 3, vision_end_token_id=V - 4)
    return Qwen2VLForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def targets() -> dict[str, PreTrainedModel]:
    return {kind: tiny_target(kind) for kind in ("llama", "qwen2_vl")}


def published_config(**overrides) -> dict:
    """config.json as SpecForge writes an EAGLE-3 Llama draft (shrunk)."""
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
           "hidden_size": H, "intermediate_size": INTER, "num_hidden_layers": 1,
           "num_attention_heads": HEADS, "num_key_value_heads": KV, "hidden_act": "silu",
           "rms_norm_eps": 1e-6, "max_position_embeddings": 256, "rope_theta": 10000.0,
           "tie_word_embeddings": False, "vocab_size": V, "draft_vocab_size": len(DRAFT_IDS),
           "torch_dtype": "float32", "transformers_version": "4.51.0"}
    cfg.update(overrides)
    return cfg


def published_state(seed: int = 0, draft_ids: torch.Tensor = DRAFT_IDS) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    d = HEADS * (H // HEADS)
    kv = KV * (H // HEADS)
    state = {"fc.weight": r(H, 3 * H),
             "midlayer.input_layernorm.weight": 1 + r(H), "midlayer.hidden_norm.weight": 1 + r(H),
             "midlayer.self_attn.q_proj.weight": r(d, 2 * H),
             "midlayer.self_attn.k_proj.weight": r(kv, 2 * H),
             "midlayer.self_attn.v_proj.weight": r(kv, 2 * H),
             "midlayer.self_attn.o_proj.weight": r(H, d),
             "midlayer.post_attention_layernorm.weight": 1 + r(H),
             "midlayer.mlp.gate_proj.weight": r(INTER, H), "midlayer.mlp.up_proj.weight": r(INTER, H),
             "midlayer.mlp.down_proj.weight": r(H, INTER),
             "norm.weight": 1 + r(H), "lm_head.weight": r(len(draft_ids), H),
             "d2t": draft_ids - torch.arange(len(draft_ids))}
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[draft_ids] = True
    state["t2d"] = t2d
    return state


def write(folder: Path, config: dict, state: dict, weights: str = "model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if weights.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, str(folder / weights))
    else:
        torch.save(state, folder / weights)
    return folder


def rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_first_slot(state: dict, embed: torch.Tensor, feature3: torch.Tensor) -> torch.Tensor:
    """The published head on ONE slot (attention over itself only: softmax = 1, so RoPE drops
    out): embed # [H], feature3 # [3H] -> target-vocabulary logits # [V]."""
    s = {k: v.float() for k, v in state.items()}
    f = s["fc.weight"] @ feature3
    x = torch.cat([rms(embed, s["midlayer.input_layernorm.weight"]),
                   rms(f, s["midlayer.hidden_norm.weight"])])
    v = s["midlayer.self_attn.v_proj.weight"] @ x  # [KV * hd]
    v = v.view(KV, -1).repeat_interleave(HEADS // KV, 0).reshape(-1)
    h = f + s["midlayer.self_attn.o_proj.weight"] @ v
    m = rms(h, s["midlayer.post_attention_layernorm.weight"])
    h = h + s["midlayer.mlp.down_proj.weight"] @ (F.silu(s["midlayer.mlp.gate_proj.weight"] @ m)
                                                  * (s["midlayer.mlp.up_proj.weight"] @ m))
    small = s["lm_head.weight"] @ rms(h, s["norm.weight"])
    out = torch.full((V,), float("-inf"))
    out[torch.arange(len(s["d2t"])) + s["d2t"].long()] = small
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2_vl"])
@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_a_published_head_loads_and_computes_the_layout(kind: str, weights: str, targets,
                                                        tmp_path: Path) -> None:
    target, state = targets[kind], published_state()
    head = load_eagle3_head(write(tmp_path / "h", published_config(), state, weights), target)
    assert head.aux_layers == (2, LAYERS // 2, LAYERS - 3)  # EAGLE-3's default ids
    assert head.draft_to_target().tolist() == DRAFT_IDS.tolist()
    tok = torch.tensor([[7]])
    feature3 = torch.randn(1, 1, 3 * H)
    u = head.fuse(tok, feature3)
    positions = torch.zeros(1, 1, dtype=torch.long)
    if kind == "qwen2_vl":
        positions = positions[None].expand(3, 1, 1)
    g = head(u, positions, torch.ones(1, 1, 1, dtype=torch.bool))
    want = reference_first_slot(state, target.get_input_embeddings().weight[7].detach(),
                                feature3[0, 0])
    got = head.logits(g)[0, 0]
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[DRAFT_IDS], want[DRAFT_IDS], rtol=1e-4, atol=1e-5)


def test_aux_layer_ids_come_from_the_eagle_config(targets, tmp_path: Path) -> None:
    cfg = published_config(eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 1, 5]})
    head = load_eagle3_head(write(tmp_path / "h", cfg, published_state()), targets["llama"])
    assert head.aux_layers == (0, 1, 5)


def test_full_vocabulary_head_needs_no_maps(targets, tmp_path: Path) -> None:
    state = published_state(draft_ids=torch.arange(V))
    del state["d2t"], state["t2d"]
    head = load_eagle3_head(write(tmp_path / "h", published_config(draft_vocab_size=V), state),
                            targets["llama"])
    assert head.draft_to_target().tolist() == list(range(V))


def _broken(case: str) -> tuple[dict, dict]:
    cfg, state = published_config(), published_state()
    if case == "hidden":
        cfg["hidden_size"] = 2 * H
    elif case == "vocab":
        cfg["vocab_size"] = V + 16
    elif case == "missing":
        del state["midlayer.hidden_norm.weight"], state["norm.weight"]
    elif case == "extra":
        state["midlayer.self_attn.q_proj.bias"] = torch.zeros(H)
    elif case == "layers":  # trained on a deeper target
        cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [2, 16, 29]}
    elif case == "embeddings":
        state["embed_tokens.weight"] = torch.randn(V, H)
    elif case == "msd":
        state = {"fc.weight": torch.zeros(H, 2 * H),
                 "layers.0.post_attention_layernorm.weight": torch.ones(H)}
    elif case == "maps":
        state["t2d"] = state["t2d"].roll(1)
    elif case == "shape":
        state["lm_head.weight"] = torch.zeros(len(DRAFT_IDS) + 1, H)
    return cfg, state


@pytest.mark.parametrize("case,message", [
    ("hidden", "hidden_size 64"), ("vocab", "larger than the target"),
    ("missing", "missing \\['midlayer.hidden_norm.weight', 'norm.weight'\\]"),
    ("extra", "unexpected \\['midlayer.self_attn.q_proj.bias'\\]"),
    ("layers", "trained for another target"), ("embeddings", "trained for another target"),
    ("msd", "not an EAGLE-3 head"), ("maps", "t2d and d2t"), ("shape", "lm_head.weight has shape"),
])
def test_a_head_that_does_not_fit_is_a_clear_error(case: str, message: str, targets,
                                                   tmp_path: Path) -> None:
    cfg, state = _broken(case)
    with pytest.raises(ValueError, match=message):
        load_eagle3_head(write(tmp_path / case, cfg, state), targets["llama"])


@pytest.mark.parametrize("kind", ["llama", "qwen2_vl"])
def test_save_writes_the_published_layout_and_loads_back(kind: str, targets, tmp_path: Path) -> None:
    target = targets[kind]
    head = new_eagle3_head(target, DRAFT_IDS, layers=(1, 3, 4))
    save_eagle3_head(head, tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["draft_vocab_size"] == len(DRAFT_IDS) and cfg["vocab_size"] == V
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    from safetensors.torch import load_file
    stored = load_file(str(tmp_path / "h" / "model.safetensors"))
    assert set(stored) == set(published_state())  # exactly the published key names
    back = load_eagle3_head(tmp_path / "h", target)
    for key, value in head.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key

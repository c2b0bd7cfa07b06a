"""MSD checkpoints: loading heads written in exactly the published EAGLE layout (independently
of our module), saving in that layout, and clear errors for heads that do not fit the target."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from lmms_sd.drafters import msd_format
from lmms_sd.drafters.msd_format import load_msd_head, save_msd_head
from lmms_sd.testing.hub_cache import put_in_cache, use_cache

V, H, INTER, HEADS, KV = 48, 32, 64, 4, 2
SECTION = [2, 1, 1]  # head_dim 8 -> 4 rotary frequencies


def tiny_target(kind: str) -> PreTrainedModel:
    torch.manual_seed(0)
    text = {"hidden_size": H, "intermediate_size": INTER, "num_hidden_layers": 1,
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


# ---------------------------------------------------------------------------- the published layout

def published_config(kind: str, **overrides) -> dict:
    """config.json as MSD ships it: the target's training config with one layer
    (EAGLE/eagle/train/llava_v15_7B_config.json and qwen2vl_config.json, shrunk)."""
    if kind == "llama":
        cfg = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
               "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
               "hidden_size": H, "intermediate_size": INTER, "max_length": 4096,
               "max_position_embeddings": 4096, "mm_hidden_size": 16,
               "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
               "num_attention_heads": HEADS, "num_hidden_layers": 1, "num_key_value_heads": KV,
               "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
               "tie_word_embeddings": False, "torch_dtype": "float16",
               "transformers_version": "4.31.0", "use_cache": True, "vocab_size": V}
    else:
        cfg = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
               "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
               "vision_start_token_id": V - 3, "image_token_id": V - 1, "hidden_act": "silu",
               "hidden_size": H, "intermediate_size": INTER, "max_position_embeddings": 32768,
               "num_attention_heads": HEADS, "num_hidden_layers": 1, "num_key_value_heads": KV,
               "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "use_sliding_window": False,
               "vision_config": {"depth": 1, "embed_dim": 16, "hidden_size": H},
               "rope_scaling": {"type": "mrope", "mrope_section": SECTION},
               "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "vocab_size": V}
    cfg.update(overrides)
    return cfg


def published_state(kind: str, embed: torch.Tensor | None, seed: int = 3) -> dict[str, torch.Tensor]:
    """The state dict of MSD's cnets.Model, by key name and shape, in bf16 (DeepSpeed's
    save_16bit_model). Built by hand, not from our module."""
    g = torch.Generator().manual_seed(seed)
    hd = H // HEADS

    def w(*shape: int) -> torch.Tensor:
        return (0.2 * torch.randn(*shape, generator=g)).to(torch.bfloat16)

    state = {"fc.weight": w(H, 2 * H), "fc.bias": w(H),
             "layers.0.self_attn.q_proj.weight": w(HEADS * hd, H),
             "layers.0.self_attn.k_proj.weight": w(KV * hd, H),
             "layers.0.self_attn.v_proj.weight": w(KV * hd, H),
             "layers.0.self_attn.o_proj.weight": w(H, HEADS * hd),
             "layers.0.mlp.gate_proj.weight": w(INTER, H), "layers.0.mlp.up_proj.weight": w(INTER, H),
             "layers.0.mlp.down_proj.weight": w(H, INTER),
             "layers.0.post_attention_layernorm.weight": 1 + w(H)}
    if kind == "qwen2_vl":  # qkv biases and an input norm; the Llama layer 0 has neither
        state.update({"layers.0.self_attn.q_proj.bias": w(HEADS * hd),
                      "layers.0.self_attn.k_proj.bias": w(KV * hd),
                      "layers.0.self_attn.v_proj.bias": w(KV * hd),
                      "layers.0.input_layernorm.weight": 1 + w(H)})
    if embed is not None:
        state["embed_tokens.weight"] = embed.detach().to(torch.bfloat16)
    return state


def write_published(folder: Path, kind: str, target: PreTrainedModel, *, config: dict | None = None,
                    state: dict | None = None, weights_file: str = "pytorch_model.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or published_config(kind)))
    state = state if state is not None else published_state(kind, target.get_input_embeddings().weight)
    if weights_file.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, str(folder / weights_file))
    else:
        torch.save(state, folder / weights_file)
    return folder


# ---------------------------------------------------------------------------- loading

@pytest.mark.parametrize("kind", ["llama", "qwen2_vl"])
def test_loads_a_head_in_the_published_layout(kind: str, targets, tmp_path: Path) -> None:
    target = targets[kind]
    folder = write_published(tmp_path / kind, kind, target)
    head = load_msd_head(folder, target)
    stored = torch.load(folder / "pytorch_model.bin", weights_only=True)
    mine = head.state_dict()
    assert set(mine) == set(stored) - {"embed_tokens.weight"}
    for key, value in mine.items():
        assert torch.equal(value, stored[key].float()), key
    assert head.target.embed_tokens is target.get_input_embeddings()
    assert head.target.lm_head is target.get_output_embeddings()
    assert head.vocab_limit is None and head.kind == kind and not head.training
    assert head.logits(torch.randn(H)).shape == (V,)


@pytest.mark.parametrize("kind,published", [("llama", "target"), ("qwen2_vl", "sequential")])
def test_a_head_runs_with_the_positions_it_was_trained_with(kind: str, published: str, targets,
                                                           tmp_path: Path) -> None:
    # a published config (no record) gets its publisher's scheme (MSD-Qwen2VL: 1-D positions);
    # our saved config records the head's scheme; a record wins; positions= overrides it
    from lmms_sd.drafters.msd import MSDConfig, MSDDrafter, qwen2_vl_rope_index

    target = targets[kind]
    head = load_msd_head(write_published(tmp_path / "pub", kind, target), target)
    assert head.positions == published
    head.positions = "sequential" if published == "target" else "target"
    saved = json.loads((save_msd_head(head, tmp_path / "ours") / "config.json").read_text())
    assert saved["lmms_sd_positions"] == head.positions
    assert load_msd_head(tmp_path / "ours", target).positions == head.positions
    old = {k: v for k, v in saved.items() if k != "lmms_sd_positions"}  # lmms_sd before the key
    (tmp_path / "ours" / "config.json").write_text(json.dumps(old))
    assert load_msd_head(tmp_path / "ours", target).positions == "target"
    if kind == "qwen2_vl":
        rope = qwen2_vl_rope_index(target)
        pub = load_msd_head(tmp_path / "pub", target)
        assert not MSDDrafter(pub, rope_index=rope).mrope
        assert MSDDrafter(pub, MSDConfig(positions="target"), rope_index=rope).mrope
    bad = published_config(kind, lmms_sd_positions="3d")
    with pytest.raises(ValueError, match="lmms_sd_positions"):
        load_msd_head(write_published(tmp_path / "bad", kind, target, config=bad), target)


def test_loads_safetensors_and_ignores_old_rotary_buffers(targets, tmp_path: Path) -> None:
    target = targets["llama"]
    state = published_state("llama", target.get_input_embeddings().weight)
    state["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # older EAGLE files
    folder = write_published(tmp_path / "st", "llama", target, state=state,
                             weights_file="model.safetensors")
    head = load_msd_head(folder, target)
    assert torch.equal(head.fc.weight, state["fc.weight"].float())


def test_loads_without_stored_embeddings(targets, tmp_path: Path) -> None:
    target = targets["llama"]
    folder = write_published(tmp_path / "noemb", "llama", target,
                             state=published_state("llama", None))
    assert load_msd_head(folder, target).fc.weight.shape == (H, 2 * H)


def test_loads_by_hub_id_through_the_hub_cache(targets, tmp_path: Path, monkeypatch) -> None:
    target = targets["llama"]
    folder = write_published(tmp_path / "hub", "llama", target)
    put_in_cache(folder, "lucylyn/MSD-LLaVA1.5-7B", tmp_path / "cache")
    use_cache(monkeypatch, tmp_path / "cache")
    head = load_msd_head("lucylyn/MSD-LLaVA1.5-7B", target)
    assert torch.equal(head.fc.bias, torch.load(folder / "pytorch_model.bin")["fc.bias"].float())
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        load_msd_head("lucylyn/MSD-LLaVA1.5-13B", target)


def test_smaller_checkpoint_vocabulary_masks_the_extra_target_ids(targets, tmp_path: Path) -> None:
    # Like a 32000-token LLaVA head under llava-hf's padded 32064-token vocabulary.
    target, small = targets["llama"], V - 8
    folder = write_published(tmp_path / "pad", "llama", target,
                             config=published_config("llama", vocab_size=small),
                             state=published_state("llama", target.get_input_embeddings().weight[:small]))
    head = load_msd_head(folder, target)
    assert head.vocab_limit == small
    logits = head.logits(torch.randn(2, H))
    assert torch.isinf(logits[:, small:]).all() and torch.isfinite(logits[:, :small]).all()


# ---------------------------------------------------------------------------- mismatches

def _mismatch(case: str, kind: str, target: PreTrainedModel) -> tuple[dict, dict]:
    embed = target.get_input_embeddings().weight
    config, state = published_config(kind), published_state(kind, embed)
    if case == "hidden":
        config["hidden_size"] = 2 * H
    elif case == "vocab":
        config["vocab_size"] = V + 16
    elif case == "layer_type":
        config = published_config("qwen2_vl")
    elif case == "model_type":
        config["model_type"] = "mistral"
    elif case == "missing_key":
        del state["layers.0.post_attention_layernorm.weight"]
    elif case == "extra_key":
        state["layers.0.input_layernorm.weight"] = torch.ones(H)
    elif case == "shape":
        config["intermediate_size"] = 2 * INTER
    elif case == "embed_values":
        state["embed_tokens.weight"] = torch.randn_like(embed).to(torch.bfloat16)
    elif case == "embed_shape":
        state["embed_tokens.weight"] = embed[: V - 1].to(torch.bfloat16)
    elif case == "rope_theta":
        config["rope_theta"] = 1e6
    return config, state


@pytest.mark.parametrize("case, message", [
    ("hidden", "hidden_size 64, the target has 32"),
    ("vocab", "vocab_size 64, larger than the target's 48"),
    ("layer_type", "holds a qwen2_vl head"),
    ("model_type", "'mistral' is not an MSD/EAGLE head type"),
    ("missing_key", r"missing \['layers.0.post_attention_layernorm.weight'\]"),
    ("extra_key", r"unexpected \['layers.0.input_layernorm.weight'\]"),
    ("shape", r"mlp.gate_proj.weight has shape \(64, 32\), the head expects \(128, 32\)"),
    ("embed_values", "trained for another target"),
    ("embed_shape", r"embed_tokens.weight has shape \(47, 32\)"),
    ("rope_theta", "rope_theta 1000000.0"),
])
def test_a_head_that_does_not_fit_the_target_is_a_clear_error(case: str, message: str, targets,
                                                             tmp_path: Path) -> None:
    target = targets["llama"]
    config, state = _mismatch(case, "llama", target)
    folder = write_published(tmp_path / case, "llama", target, config=config, state=state)
    with pytest.raises(ValueError, match=message):
        load_msd_head(folder, target)


def test_mrope_section_mismatch_is_an_error(targets, tmp_path: Path) -> None:
    target = targets["qwen2_vl"]
    config = published_config("qwen2_vl", rope_scaling={"type": "mrope", "mrope_section": [1, 2, 1]})
    folder = write_published(tmp_path / "mrope", "qwen2_vl", target, config=config)
    with pytest.raises(ValueError, match="mrope_section"):
        load_msd_head(folder, target)


def test_a_folder_without_a_head_is_an_error(tmp_path: Path, targets) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        load_msd_head(tmp_path, targets["llama"])


# ---------------------------------------------------------------------------- saving

@pytest.mark.parametrize("kind", ["llama", "qwen2_vl"])
def test_save_writes_the_published_layout_and_loads_back(kind: str, targets, tmp_path: Path) -> None:
    target = targets[kind]
    head = load_msd_head(write_published(tmp_path / "src", kind, target), target)
    out = save_msd_head(head, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "pytorch_model.bin"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("llava" if kind == "llama" else "qwen2_vl")
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (H, 1, V)
    assert config["bias"] is True
    if kind == "qwen2_vl":
        assert config["rope_scaling"] == {"type": "mrope", "mrope_section": SECTION}
    stored = torch.load(out / "pytorch_model.bin", weights_only=True)
    published = published_state(kind, target.get_input_embeddings().weight)
    assert sorted(stored) == sorted(published)  # same key set as the published file
    assert torch.allclose(stored["embed_tokens.weight"], target.get_input_embeddings().weight)
    again = load_msd_head(out, target)
    x = torch.randn(3, H)
    assert torch.equal(again.logits(x), head.logits(x))
    for key, value in head.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_save_rejects_unknown_weight_file_names(targets, tmp_path: Path) -> None:
    target = targets["llama"]
    head = load_msd_head(write_published(tmp_path / "src", "llama", target), target)
    with pytest.raises(ValueError, match="weights_file"):
        save_msd_head(head, tmp_path / "out", weights_file="weights.pt")
    save_msd_head(head, tmp_path / "st", weights_file="model.safetensors")
    assert torch.equal(load_msd_head(tmp_path / "st", target).fc.weight, head.fc.weight)


@pytest.mark.parametrize("kind", ["llama", "qwen2_vl"])
def test_a_new_head_has_the_shape_of_one_target_layer(kind: str, targets) -> None:
    from lmms_sd.drafters.msd_format import new_msd_head

    target = targets[kind]
    head = new_msd_head(target)
    text = target.config.get_text_config()
    for field in ("hidden_size", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps"):
        assert getattr(head.config, field) == getattr(text, field), field
    assert head.config.num_hidden_layers == 1 and head.vocab_limit is None
    assert head.config.rope_parameters == text.rope_parameters

"""The tiny model suite: tokenizer, processors, configs, and the save/reload round trip."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmms_sd.adapters import HFAdapter, load_adapter
from lmms_sd.adapters.loading import load_processor
from lmms_sd.adapters.qwen2_vl import Qwen2VLImageOnlyProcessor
from lmms_sd.testing.tiny import (CORPUS, FAMILIES, ROLES, SPECIAL_TOKENS, build_tiny_models,
                                  qwen2_vl_config, tiny_image, train_tokenizer)

IMAGE_TOKEN = {"llava": "<image>", "qwen2_vl": "<|image_pad|>"}


@pytest.mark.parametrize("fam", FAMILIES)
def test_tokenizer_round_trips_text_and_keeps_special_tokens_whole(fam: str) -> None:
    # byte-level BPE: any text decodes back exactly; each special token is one id
    tok = train_tokenizer(CORPUS, 400, fam)
    text = "A red circle, 3 blue squares & ünïcödé ✓."
    assert tok.decode(tok(text)["input_ids"]) == text
    spec = SPECIAL_TOKENS[fam]
    for special in [spec["eos"], spec["pad"], *spec["extra"]]:
        assert len(tok(special)["input_ids"]) == 1, special
    assert tok.eos_token == spec["eos"] and tok.pad_token == spec["pad"]


def test_tokenizer_trains_on_a_custom_corpus() -> None:
    # special-token ids do not depend on the corpus; the learned merges do
    a = train_tokenizer(["triangle " * 50], 300, "qwen2_vl")
    b = train_tokenizer(CORPUS, 300, "qwen2_vl")
    assert a.convert_tokens_to_ids("<|image_pad|>") == b.convert_tokens_to_ids("<|image_pad|>")
    assert len(a("triangle")["input_ids"]) < len(b("triangle")["input_ids"])
    with pytest.raises(ValueError, match="unknown model family 'gpt'"):
        train_tokenizer(CORPUS, 300, "gpt")


@pytest.mark.parametrize("fam, expected", [
    ("llava", "USER: <image>\nHi? ASSISTANT: Yes.</s> USER: More ASSISTANT:"),
    ("qwen2_vl", ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n"
                  "<|im_start|>assistant\nYes.<|im_end|>\n<|im_start|>user\nMore<|im_end|>\n"
                  "<|im_start|>assistant\n")),
])
def test_chat_templates(fam: str, expected: str) -> None:
    # the family's prompt format, with images first in the user turn and a generation prompt
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]},
                {"role": "assistant", "content": "Yes."},
                {"role": "user", "content": "More"}]
    tok = train_tokenizer(CORPUS, 400, fam)
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected


@pytest.mark.parametrize("fam, size, n_tokens", [
    ("llava", (32, 32), 16), ("llava", (64, 40), 16),  # LLaVA resizes and crops to 32 x 32
    ("qwen2_vl", (32, 32), 16), ("qwen2_vl", (48, 32), 24),  # Qwen2-VL keeps the aspect ratio
])
def test_processors_expand_images_without_torchvision(tiny_paths: dict[str, dict[str, Path]],
                                                      fam: str, size: tuple[int, int],
                                                      n_tokens: int) -> None:
    # saved processors reload and expand one image into a small number of placeholder tokens
    processor = load_processor(tiny_paths[fam]["target"])
    if fam == "qwen2_vl":
        assert isinstance(processor, Qwen2VLImageOnlyProcessor)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
        add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[tiny_image(0, *size)], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[fam])
    assert int((enc["input_ids"] == image_id).sum()) == n_tokens


def test_qwen2_vl_mrope_section_covers_half_the_head() -> None:
    # M-RoPE splits head_dim / 2 rotary frequencies over (time, height, width)
    tok = train_tokenizer(CORPUS, 300, "qwen2_vl")
    for width, heads in [(128, 4), (64, 2), (96, 2), (256, 8)]:
        text = qwen2_vl_config(tok, width=width, heads=heads).text_config
        section = text.rope_parameters["mrope_section"]
        assert sum(section) == width // heads // 2 and min(section) > 0


@pytest.mark.parametrize("fam", FAMILIES)
def test_suite_shares_vocabulary_and_vision(fam: str, every_tiny_adapters: dict[
                                            str, dict[str, HFAdapter]]) -> None:
    # every role has the tokenizer's vocabulary; the draft VLM has the target's vision tower
    # (Qwen2-VL's vision hidden_size, Qwen2.5-VL's and Qwen3-VL's out_hidden_size are the
    # merger's output width, i.e. the text width)
    suite = every_tiny_adapters[fam]
    sizes = {role: suite[role].vocab_size for role in ROLES}
    assert set(sizes.values()) == {len(suite["target"].tokenizer)}, sizes
    t_vision = suite["target"].model.config.vision_config.to_dict()
    d_vision = suite["draft_vlm"].model.config.vision_config.to_dict()
    merger = {"qwen2_vl": "hidden_size", "qwen2_5_vl": "out_hidden_size",
              "qwen3_vl": "out_hidden_size"}.get(fam)
    if merger is not None:
        draft_width = suite["draft_vlm"].model.config.text_config.hidden_size
        assert d_vision.pop(merger) == draft_width
        t_vision.pop(merger)
    assert t_vision == d_vision
    d_layers = suite["draft_vlm"].model.config.text_config.num_hidden_layers
    assert d_layers < suite["target"].model.config.text_config.num_hidden_layers


@pytest.mark.parametrize("fam", FAMILIES)
def test_save_reload_round_trip(fam: str, every_tiny_paths: dict[str, dict[str, Path]]) -> None:
    # the saved suite reloads to the same weights and logits as a fresh in-memory build
    built, _, _ = build_tiny_models(fam, seed=0)
    ids = torch.arange(3, 40)[None]
    for role in ROLES:
        reloaded = load_adapter(every_tiny_paths[fam][role]).model
        fresh, saved = built[role].state_dict(), reloaded.state_dict()
        assert fresh.keys() == saved.keys()
        for name, tensor in fresh.items():
            assert torch.equal(tensor, saved[name]), name
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits,
                                       built[role](input_ids=ids).logits)


def test_seeds_change_weights() -> None:
    # a different seed gives a different model (the round trip above is not vacuous)
    a, _, _ = build_tiny_models("llava", seed=0)
    b, _, _ = build_tiny_models("llava", seed=1)
    wa = a["target"].get_output_embeddings().weight
    wb = b["target"].get_output_embeddings().weight
    assert not torch.equal(wa, wb)

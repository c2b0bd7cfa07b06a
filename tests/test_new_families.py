"""Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision beyond the losslessness table: their classes resolve
through lmms-eval's registry, their tiny configs keep the published structure, MSD heads of
their architectures decode losslessly, DeepStack reaches the decoder, and OneVision's image-token
count follows the image's size."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from lmms_sd.adapters import HFAdapter
from lmms_sd.adapters.qwen3_vl import Qwen3VLAdapter
from lmms_sd.core.generate import GenerationConfig, generate
from lmms_sd.drafters.model import ModelDrafter
from lmms_sd.drafters.msd import load_msd_drafter
from lmms_sd.drafters.msd_format import new_msd_head, save_msd_head
from lmms_sd.testing.scripted import ScriptedDrafter
from lmms_sd.testing.tiny import tiny_image
from lmms_sd.trees import make_builder

NEW = ("qwen2_5_vl", "qwen3_vl", "llava_onevision")
FIXTURES = Path(__file__).parent / "fixtures" / "real"
MAX_NEW = 16


@pytest.mark.parametrize("family", NEW)
def test_classes_resolve_through_lmms_eval(family: str) -> None:
    # every method of the family is a manifest of our entry point, resolving to its class
    from lmms_sd.lmms_eval.names import METHOD_FAMILIES
    from lmms_sd.lmms_eval.registry import MANIFESTS
    from lmms_sd.methods import METHODS

    by_id = {m.model_id: m for m in MANIFESTS}
    for method in METHODS:
        if family not in METHOD_FAMILIES.get(method, (family,)):  # e.g. eagle3: llava, qwen2_vl
            assert f"{family}_{method}" not in by_id
            continue
        manifest = by_id[f"{family}_{method}"]
        for path, simple in ((manifest.simple_class_path, True),
                             (manifest.chat_class_path, False)):
            module, name = path.rsplit(".", 1)
            cls = getattr(importlib.import_module(module), name)
            assert (cls.family, cls.method, cls.is_simple) == (family, method, simple)


STRUCTURE = {  # fixture folder, [(path in the published config, path in the tiny config)]
    "qwen2_5_vl": ("Qwen2.5-VL-7B-Instruct", [
        "vision_config.hidden_act", "vision_config.spatial_merge_size",
        "vision_config.temporal_patch_size", "vision_config.tokens_per_second", "hidden_act",
        ("rope_scaling.type", None), "model_type"]),
    "qwen3_vl": ("Qwen3-VL-8B-Instruct", [
        "vision_config.hidden_act", "vision_config.spatial_merge_size",
        "text_config.hidden_act", "text_config.attention_bias", "text_config.model_type",
        ("text_config.rope_scaling.mrope_interleaved",
         "text_config.rope_parameters.mrope_interleaved"), "model_type"]),
    "llava_onevision": ("llava-onevision-qwen2-7b-ov-hf", [
        "vision_feature_select_strategy", "vision_feature_layer", "vision_aspect_ratio",
        "use_image_newline_parameter", "projector_hidden_act", "text_config.model_type",
        "vision_config.model_type", "vision_config.vision_use_head", "model_type"]),
}


def _get(config: dict, path: str):
    for key in path.split("."):
        config = config[key]
    return config


@pytest.mark.parametrize("family", NEW)
def test_tiny_configs_keep_the_published_structure(family: str, every_tiny_paths) -> None:
    # the non-size keys of the published config have the same values in the tiny one
    folder, keys = STRUCTURE[family]
    published = json.loads((FIXTURES / folder / "config.json").read_text())
    tiny = json.loads((every_tiny_paths[family]["target"] / "config.json").read_text())
    if family == "qwen2_5_vl":  # transformers 5 writes the text keys into text_config
        tiny = {**tiny["text_config"], **tiny}
    for key in keys:
        ours, theirs = (key, key) if isinstance(key, str) else (key[1] or key[0], key[0])
        if ours == "rope_scaling.type":  # M-RoPE: a section in rope_parameters
            assert "mrope_section" in tiny["text_config"]["rope_parameters"]
            continue
        assert _get(tiny, ours) == _get(published, theirs), key
    vision = published["vision_config"]
    if "deepstack_visual_indexes" in vision:  # DeepStack feeds as many decoder layers
        assert len(tiny["vision_config"]["deepstack_visual_indexes"]) >= 1
    if "fullatt_block_indexes" in vision:  # window attention with full-attention blocks
        assert tiny["vision_config"]["fullatt_block_indexes"]
        assert tiny["vision_config"]["window_size"] > 0


@pytest.mark.parametrize("family", NEW)
def test_msd_head_of_the_family_is_lossless(family: str, every_tiny_adapters, tmp_path) -> None:
    # a head of the target's own layer kind, saved and reloaded in the published layout,
    # drafts chains and trees whose output equals the target's generate
    target = every_tiny_adapters[family]["target"]
    torch.manual_seed(0)
    head = new_msd_head(target.model)
    assert head.kind == {"qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl",
                         "llava_onevision": "qwen2"}[family]
    folder = save_msd_head(head, tmp_path / "head")
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=target.eos_token_ids)
    for text, images in [("What is in the image?", [tiny_image(0)]),
                         ("Describe it.", [tiny_image(1, 48, 32)]), ("A story.", [])]:
        prompt = target.prepare(text, images)
        reference = target.hf_generate(prompt, MAX_NEW)
        for tree, settings in (("chain", {"k": 3}),
                               ("dynamic", {"depth": 3, "top_k": 2, "total_tokens": 6})):
            drafter = load_msd_drafter(str(folder), target.model)
            assert drafter.mrope == (family != "llava_onevision")
            out = generate(target, prompt, cfg, drafter, make_builder(tree, **settings))
            assert out.tokens == reference, (family, tree, text)


def test_deepstack_reaches_the_decoder_at_prefill(every_tiny_adapters, monkeypatch) -> None:
    # the prefill's logits equal the HF model's forward; without the DeepStack features
    # (a broken adapter) they do not
    target = every_tiny_adapters["qwen3_vl"]["target"]
    prompt = target.prepare("What is in the image?", [tiny_image(0)])
    with torch.no_grad():
        want = target.model(input_ids=prompt.input_ids[None], **prompt.model_kwargs).logits[0]
    torch.testing.assert_close(target.prefill(prompt).logits, want, atol=1e-4, rtol=0)
    monkeypatch.setattr(Qwen3VLAdapter, "_prefill_decoder_kwargs", lambda self: {})
    broken = target.prefill(prompt).logits
    assert float((broken - want).abs().max()) > 1e-3


SIZES = [(32, 32), (48, 16), (16, 48), (40, 24), (24, 24)]  # (width, height)


def test_onevision_image_tokens_follow_the_image_size(every_tiny_adapters) -> None:
    # any-resolution tiles: images of several sizes and aspect ratios give different numbers
    # of image tokens (newlines included), and speculative output still equals generate
    suite = every_tiny_adapters["llava_onevision"]
    target: HFAdapter = suite["target"]
    counts = set()
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=target.eos_token_ids)
    for seed, (width, height) in enumerate(SIZES):
        prompt = target.prepare("What is in the image?", [tiny_image(10 + seed, width, height)])
        counts.add(int(prompt.image_mask.sum()))
        reference = target.hf_generate(prompt, MAX_NEW)
        for drafter in (ModelDrafter(suite["draft_vlm"], vocab_size=target.vocab_size),
                        ScriptedDrafter(reference, 2, target.vocab_size)):
            out = generate(target, prompt, cfg, drafter, make_builder("chain", k=4))
            assert out.tokens == reference, (width, height)
    assert len(counts) >= 4, counts


@pytest.mark.parametrize("family", NEW)
def test_both_request_kinds_through_the_lmms_eval_classes(family: str, every_tiny_paths,
                                                          tmp_path: Path) -> None:
    # <family>_sd (draft VLM) on a simple and a chat request, <family>_msd (a fresh head) on a
    # chat one: every record matches the autoregressive baseline; both kinds give one text
    from test_lmms_eval_plugin import make_model, records_of

    from lmms_sd.adapters import load_adapter

    paths = every_tiny_paths[family]
    head = save_msd_head(new_msd_head(load_adapter(paths["target"]).model), tmp_path / "head")
    runs = [("SD", False, paths["draft_vlm"], {"tree": "chain", "tree.k": 3}),
            ("SD", True, paths["draft_vlm"], {"tree": "chain", "tree.k": 3}),
            ("MSD", True, head, {"tree": "dynamic", "tree.depth": 3, "tree.top_k": 2,
                                 "tree.total_tokens": 6})]
    texts = []
    for method, chat, draft, tree in runs:
        model = make_model(family, chat, method, pretrained=paths["target"], draft=draft,
                           baseline=True, **tree)
        out, records = records_of(model, chat, tmp_path / f"{method}{chat}.jsonl", n=1)
        assert records and all(r["text_match"] for r in records), (method, chat)
        texts.append([o.text for o in out])
    assert texts[0] == texts[1] == texts[2]


@pytest.mark.parametrize("family", NEW)
def test_msd_training_loss_on_a_multimodal_batch(family: str, every_tiny_adapters) -> None:
    # the trainer's target pass captures the merged image embeddings (any-res tiles included)
    # and positions of each family, and MSD's loss reaches the head's weights
    from lmms_sd.train.data import ShapesCollator
    from lmms_sd.train.loop import train_items
    from lmms_sd.train.msd import MSDTrainConfig, head_loss, target_pass

    target = every_tiny_adapters[family]["target"]
    head = new_msd_head(target.model).float()
    batch = ShapesCollator(target.processor)(train_items(0, 2, 0))
    tp = target_pass(target.model, batch)
    image = batch.input_ids == target.image_token_id
    assert image.any()
    assert not torch.allclose(tp.embeds[image], target.embed_tokens(batch.input_ids[image]))
    loss, _ = head_loss(head, batch, tp, MSDTrainConfig(), target.image_token_id)
    loss.backward()
    assert torch.isfinite(loss) and float(head.fc.weight.grad.abs().sum()) > 0


def test_draft_vlm_with_more_padding_rows_is_lossless(every_tiny_paths, tmp_path: Path) -> None:
    # Qwen2.5-VL-7B has 152064 embedding rows, 3B 151936 over one tokenizer: a draft whose
    # vocabulary rows go past the target's passes the vocabulary rules, its padding rows are
    # dropped, and the output still equals the target's generate
    from lmms_sd.adapters import check_same_vocab, load_adapter
    from lmms_sd.adapters.loading import load_processor

    paths = every_tiny_paths["qwen2_5_vl"]
    target = load_adapter(paths["target"])
    draft_model = load_adapter(paths["draft_vlm"]).model
    draft_model.resize_token_embeddings(target.vocab_size + 64)
    draft_model.save_pretrained(tmp_path / "padded")
    load_processor(paths["draft_vlm"]).save_pretrained(tmp_path / "padded")
    draft = load_adapter(tmp_path / "padded", role="draft")
    assert draft.vocab_size == target.vocab_size + 64
    check_same_vocab(target, draft)
    prompt = target.prepare("What is in the image?", [tiny_image(0)])
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=target.eos_token_ids)
    out = generate(target, prompt, cfg, ModelDrafter(draft, vocab_size=target.vocab_size),
                   make_builder("chain", k=3))
    assert out.tokens == target.hf_generate(prompt, MAX_NEW)


@pytest.mark.parametrize("family", NEW)
def test_image_aspect_ratio_pad_is_a_no_op_and_others_fail(family: str,
                                                           every_tiny_adapters) -> None:
    # the newer processors keep the aspect ratio themselves (patch grids, any-res tiles)
    target = every_tiny_adapters[family]["target"]
    image = tiny_image(21, 48, 24)
    a, b = (target.prepare("x", [image], image_aspect_ratio=r) for r in ("original", "pad"))
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.model_kwargs["pixel_values"], b.model_kwargs["pixel_values"])
    with pytest.raises(ValueError, match="image_aspect_ratio='anyres'"):
        target.prepare("x", [image], image_aspect_ratio="anyres")

"""The ``eagle3`` method: EAGLE-3's published tree by default, every tree builder selectable,
and greedy output through ``lmms_sd.load`` (the lmms-eval classes' decoder) equal to plain
decoding of the same target."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmms_sd
from lmms_sd.drafters.eagle3_format import new_eagle3_head, save_eagle3_head
from lmms_sd.methods import method_class, split_model_name
from lmms_sd.testing.tiny import tiny_image
from lmms_sd.trees.dynamic import DynamicConfig


@pytest.fixture(scope="module")
def head_folder(tiny_paths, tiny_adapters, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    target = tiny_adapters["llava"]["target"]
    head = new_eagle3_head(target.model, torch.arange(0, target.vocab_size, 3))
    return save_eagle3_head(head, tmp_path_factory.mktemp("eagle3") / "head")


def test_the_default_tree_is_eagle3s_published_one() -> None:
    default = method_class("eagle3").parse({"pretrained": "x", "draft": "y"}, "llava_eagle3")
    assert default.tree.cfg == DynamicConfig(depth=7, top_k=10, total_tokens=60)
    one = method_class("eagle3").parse({"pretrained": "x", "draft": "y", "tree.depth": "3"},
                                       "llava_eagle3")
    assert one.tree.cfg == DynamicConfig(depth=3, top_k=10, total_tokens=60)


def test_the_class_names_resolve() -> None:
    assert split_model_name("llava_eagle3") == ("llava", "eagle3")
    assert split_model_name("qwen2_vl_eagle3") == ("qwen2_vl", "eagle3")
    from lmms_sd.lmms_eval import models
    assert models.LlavaEagle3Chat.method == models.Qwen2VLEagle3.method == "eagle3"


@pytest.mark.parametrize("tree,settings", [
    ("chain", {"tree.k": 3}),
    ("dynamic", {"tree.depth": 2, "tree.top_k": 2, "tree.total_tokens": 6}),
    ("opt", {"tree.nodes": 6, "tree.max_depth": 3}),
    ("static", {"tree.acceptance": "0.5,0.2", "tree.budget": 6, "tree.max_depth": 3}),
])
@pytest.mark.parametrize("decouple", [False, True])
def test_load_decodes_losslessly_with_every_builder(tree: str, settings: dict, decouple: bool,
                                                    tiny_paths, head_folder: Path) -> None:
    sd = lmms_sd.load(tiny_paths["llava"]["target"], "eagle3", draft=head_folder, tree=tree,
                      decouple_images=decouple, device="cpu", **settings)
    assert sd.target.hidden_layers == sd.drafter.head.aux_layers
    out = sd.generate(tiny_image(3), "Describe the image.", max_new_tokens=12, baseline=True)
    assert out.tokens == out.baseline.tokens and out.greedy_match


@pytest.fixture(scope="module")
def qwen_head_folder(tiny_adapters, tmp_path_factory) -> Path:
    torch.manual_seed(1)
    target = tiny_adapters["qwen2_vl"]["target"]
    head = new_eagle3_head(target.model, torch.arange(0, target.vocab_size, 3))
    return save_eagle3_head(head, tmp_path_factory.mktemp("eagle3_qwen") / "head")


@pytest.mark.parametrize("chat", [False, True])
def test_the_lmms_eval_classes_decode_like_autoregression(chat: bool, family: str, tiny_paths,
                                                           head_folder: Path,
                                                           qwen_head_folder: Path,
                                                           tmp_path: Path) -> None:
    """``llava_eagle3`` / ``qwen2_vl_eagle3`` (simple and chat) on lmms-eval requests: every
    text equals the autoregressive one (``baseline=true``'s record) under EAGLE-3's tree."""
    import json

    from test_lmms_eval_plugin import GREEDY, make_model, requests

    head = head_folder if family == "llava" else qwen_head_folder
    model = make_model(family, chat, "Eagle3", pretrained=tiny_paths[family]["target"],
                       draft=head, baseline=True, stats_path=tmp_path / "s.jsonl")
    out = model.generate_until(requests(chat, GREEDY))
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(records) == len(out) and all(r["text_match"] for r in records)
    assert all(o.text for o in out)


def test_qwen2_5_vl_eagle3_decodes_losslessly(every_tiny_paths, every_tiny_adapters,
                                              tmp_path: Path) -> None:
    """``qwen2_5_vl_eagle3``: an EAGLE-3 head of Qwen2.5-VL's M-RoPE layers, through the class
    names' API path (``open_model``), decodes exactly like autoregression."""
    from lmms_sd.api import open_model

    torch.manual_seed(2)
    target = every_tiny_adapters["qwen2_5_vl"]["target"]
    head = new_eagle3_head(target.model, torch.arange(0, target.vocab_size, 2))
    assert head.kind == "qwen2_5_vl"
    folder = save_eagle3_head(head, tmp_path / "head")
    sd = open_model("qwen2_5_vl_eagle3", {"pretrained": str(every_tiny_paths["qwen2_5_vl"]["target"]),
                                          "draft": str(folder), "tree": "chain", "tree.k": 3,
                                          "device": "cpu"})
    out = sd.generate(tiny_image(4), "Describe the image.", max_new_tokens=12, baseline=True)
    assert out.tokens == out.baseline.tokens and out.greedy_match

"""Tiny checkpoints in the format of the published ones, for tests of the real loading path.

Each builder writes a folder laid out like the hub repo it mimics: the published config.json
with only its sizes replaced (``tests/fixtures/real/``), the weights under the published
(pre-transformers-5) tensor names, the real chat template, and a tokenizer with the real
special tokens at the real ids. The vocabularies are real-sized with filler tokens (only a small
BPE is reachable), so the id and row counts are the published ones:

  llava-hf/llava-1.5-7b-hf       32000 Llama tokens + <image> 32000, <pad> 32001; 32064 rows
  lmsys/vicuna-7b-v1.5 (draft)   the 32000 Llama tokens; 32000 rows
  Qwen/Qwen2-VL-7B-Instruct      151643 tokens + 14 added (151643..151656); 152064 rows
  Qwen/Qwen2-VL-2B-Instruct      the same tokenizer; 151936 rows, tied embeddings
  lucylyn/MSD-LLaVA1.5-7B        MSD's config (LlavaLlamaForCausalLM, vocab 32000)
  lucylyn/MSD-Qwen2VL-7B-Instruct  MSD's config (Qwen2-VL-7B's with 1 layer)
"""
from __future__ import annotations

import copy
import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, processors
from transformers import (
    AutoConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2VLForConditionalGeneration,
)

from .tiny import CORPUS

LLAMA_TOKENS, QWEN_TOKENS = 32000, 151643
QWEN_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
              "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
              "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
              "<|image_pad|>", "<|video_pad|>"]
ROWS = {"llava-hf": 32064, "vicuna": 32000, "qwen2-vl-7b": 152064, "qwen2-vl-2b": 151936}
LM_SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2}
# transformers 5 name -> the published name (llava-hf and Qwen2-VL saved with transformers 4)
OLD_NAMES = {"llava": [("model.language_model.", "language_model.model."),
                       ("lm_head.", "language_model.lm_head."),
                       ("model.vision_tower.", "vision_tower."),
                       ("model.multi_modal_projector.", "multi_modal_projector.")],
             "qwen2_vl": [("model.language_model.", "model."), ("model.visual.", "visual.")]}


def fixture(fixtures: Path, repo: str, name: str = "config.json") -> dict[str, Any]:
    return json.loads((fixtures / repo / name).read_text())


# ---------------------------------------------------------------------------- tokenizers

def _filled_bpe(specials: list[str], size: int) -> Tokenizer:
    """A byte-level BPE trained on the tiny corpus, its vocabulary filled up to ``size`` ids
    with unreachable filler tokens, ``specials`` first."""
    from .tiny import train_tokenizer
    small = train_tokenizer(CORPUS, 400, "llava")._tokenizer
    doc = json.loads(small.to_str())
    old = {t: i for t, i in doc["model"]["vocab"].items()
           if t not in {a["content"] for a in doc["added_tokens"]}}
    vocab = {t: i for i, t in enumerate(specials)}
    for t in sorted(old, key=old.get):
        vocab[t] = len(vocab)
    for i in range(len(vocab), size):
        vocab[f"<filler_{i}>"] = i
    doc["model"]["vocab"], doc["added_tokens"] = vocab, []
    doc["post_processor"] = None
    tok = Tokenizer.from_str(json.dumps(doc))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


@cache
def _cached(kind: str) -> PreTrainedTokenizerFast:
    return {"llava-hf": lambda: _llama(True), "vicuna": lambda: _llama(False),
            "qwen2-vl": _qwen}[kind]()


def llama_tokenizer(with_llava_tokens: bool) -> PreTrainedTokenizerFast:
    """Vicuna's tokenizer, or llava-hf's (built once per process)."""
    return copy.deepcopy(_cached("llava-hf" if with_llava_tokens else "vicuna"))


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2-VL's tokenizer (built once per process)."""
    return copy.deepcopy(_cached("qwen2-vl"))


def _llama(with_llava_tokens: bool) -> PreTrainedTokenizerFast:
    """Vicuna's ids (<unk> 0, <s> 1, </s> 2, 32000 tokens, BOS added); with llava-hf's
    <image> 32000 and <pad> 32001 appended."""
    tok = _filled_bpe(["<unk>", "<s>", "</s>"], LLAMA_TOKENS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    extra = ["<image>", "<pad>"] if with_llava_tokens else []
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in extra])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>",
                                   pad_token="<pad>" if with_llava_tokens else None)


def _qwen() -> PreTrainedTokenizerFast:
    """Qwen2's ids: 151643 tokens, then the 14 added tokens; no BOS."""
    tok = _filled_bpe([], QWEN_TOKENS)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in QWEN_ADDED])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN_ADDED[1:])


# ---------------------------------------------------------------------------- folders

def _write(model: torch.nn.Module, config: dict[str, Any], folder: Path,
           family: str | None) -> None:
    """Weights under the published names, then the published-format config.json."""
    model.save_pretrained(folder)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    for new, old in OLD_NAMES.get(family, []):
        state = {(old + k[len(new):] if k.startswith(new) else k): v for k, v in state.items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _build(config: dict[str, Any], cls: type, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(AutoConfig.for_model(**config) if "model_type" in config else config).eval()


def _copy(fixtures: Path, repo: str, folder: Path, names: list[str]) -> None:
    for name in names:
        shutil.copy(fixtures / repo / name, folder / name)


def build_llava_hf(fixtures: Path, folder: Path, seed: int = 0) -> Path:
    """llava-hf/llava-1.5-7b-hf with tiny sizes (CLIP 2 layers on 56 px images, patch 14)."""
    config = fixture(fixtures, "llava-1.5-7b-hf")
    config["text_config"].update(LM_SIZES)
    config["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, image_size=56, projection_dim=32)
    model = _build(config, LlavaForConditionalGeneration, seed)
    _write(model, config, folder, "llava")
    llama_tokenizer(True).save_pretrained(folder)
    _copy(fixtures, "llava-1.5-7b-hf", folder,
          ["chat_template.json", "processor_config.json", "generation_config.json"])
    pre = fixture(fixtures, "llava-1.5-7b-hf", "preprocessor_config.json")
    pre.update(crop_size={"height": 56, "width": 56}, size={"shortest_edge": 56})
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return folder


def build_vicuna(folder: Path, seed: int = 1) -> Path:
    """A Vicuna-like text-only draft: Llama, 32000 tokens and rows, 1 layer."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
              "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16",
              **LM_SIZES, "num_hidden_layers": 1}
    _write(_build(config, LlamaForCausalLM, seed), config, folder, None)
    llama_tokenizer(False).save_pretrained(folder)
    return folder


def qwen2_vl_tiny_config(fixtures: Path, rows: int, tie: bool) -> dict[str, Any]:
    config = fixture(fixtures, "Qwen2-VL-7B-Instruct")
    config.update(LM_SIZES, num_key_value_heads=1, max_window_layers=2, vocab_size=rows,
                  tie_word_embeddings=tie)
    config["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}  # head_dim 16
    config["vision_config"].update(depth=2, embed_dim=32, num_heads=2, hidden_size=32)
    return config


def build_qwen2_vl(fixtures: Path, folder: Path, rows: int = ROWS["qwen2-vl-7b"],
                   tie: bool = False, seed: int = 0) -> Path:
    """Qwen/Qwen2-VL-7B-Instruct with tiny sizes (``rows`` 151936 and ``tie``: the 2B's)."""
    config = qwen2_vl_tiny_config(fixtures, rows, tie)
    _write(_build(config, Qwen2VLForConditionalGeneration, seed), config, folder, "qwen2_vl")
    qwen_tokenizer().save_pretrained(folder)
    _copy(fixtures, "Qwen2-VL-7B-Instruct", folder,
          ["chat_template.json", "preprocessor_config.json", "generation_config.json"])
    return folder


def build_msd_head(fixtures: Path, target_folder: Path, folder: Path, seed: int = 2) -> Path:
    """An MSD head for the tiny target at ``target_folder``, with MSD's published config keys
    (sizes replaced) and tensors (fc, layers.0, embed_tokens rows up to its vocab_size)."""
    from ..adapters.loading import load_adapter
    from ..drafters.msd_format import new_msd_head, save_msd_head
    target = load_adapter(target_folder).model
    kind = target.config.model_type
    torch.manual_seed(seed)
    head = new_msd_head(target)
    save_msd_head(head, folder)
    if kind == "llava":
        config = fixture(fixtures, "MSD-LLaVA1.5-7B")
        config.update(LM_SIZES, num_hidden_layers=1, mm_hidden_size=32)
    else:
        config = qwen2_vl_tiny_config(fixtures, ROWS["qwen2-vl-7b"], False)
        config["num_hidden_layers"] = 1
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["embed_tokens.weight"] = state["embed_tokens.weight"][:config["vocab_size"]].clone()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder

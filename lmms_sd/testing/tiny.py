"""A tiny, offline model suite for tests: targets of every VLM family with their drafts.

Everything is built from configs in seconds, saved with ``save_pretrained`` and meant to be
reloaded with ``from_pretrained`` so tests exercise the real loading path. Per family:

  target      the VLM (LLaVA: CLIP vision tower + Llama; Qwen2-VL / Qwen2.5-VL / Qwen3-VL: their
              own vision towers + M-RoPE (Qwen3-VL interleaved, with DeepStack); LLaVA-OneVision:
              SigLIP + Qwen2 with any-resolution tiles and image newlines)
  draft_vlm   the same family with a 1-layer, narrower language model and the *same* vision
              config and processor, so it accepts the target's processed inputs
  text_only   a plain causal LM (Llama / Qwen2 / Qwen3) sharing the vocabulary

The configs of the newer families carry the keys of the published ones (Qwen/Qwen2.5-VL-7B-
Instruct, Qwen/Qwen3-VL-8B-Instruct, llava-hf/llava-onevision-qwen2-7b-ov-hf: window attention
and full-attention blocks, DeepStack indexes, interleaved M-RoPE, grid pinpoints, image
newline) with only the sizes shrunk.

The tokenizer is a byte-level BPE trained locally on a small built-in corpus. The config helpers
and ``train_tokenizer`` take knobs so a trainer (e.g. on a synthetic shapes task) can reuse them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaOnevisionConfig,
                          LlavaOnevisionForConditionalGeneration, LlavaProcessor, PreTrainedModel,
                          PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM,
                          Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                          SiglipVisionConfig)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..adapters.llava_onevision import LlavaOnevisionImageOnlyProcessor
from ..adapters.loading import load_processor  # noqa: F401  (re-exported for trainers)
from ..adapters.qwen2_5_vl import Qwen2_5_VLImageOnlyProcessor
from ..adapters.qwen2_vl import Qwen2VLImageOnlyProcessor
from ..adapters.qwen3_vl import Qwen3VLImageOnlyProcessor

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")
QWEN_VL = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # one tokenizer layout and chat template
ROLES = ("target", "draft_vlm", "text_only")

# ---------------------------------------------------------------------------- tokenizer

CORPUS = [
    "A red circle is in the top left corner of the image.",
    "There are two blue squares and one green triangle.",
    "The picture shows a small yellow star next to a large purple circle.",
    "Describe the image. The image contains three shapes on a white background.",
    "How many shapes are there? There are three shapes.",
    "What colour is the square? The square is orange.",
    "A cat sits on the mat and looks at the window.",
    "The quick brown fox jumps over the lazy dog.",
    "She opened the door, walked into the room and turned on the light.",
    "Numbers: one, two, three, four, five, six, seven, eight, nine, ten, 0 1 2 3 4 5 6 7 8 9.",
    "The weather is sunny today, with a light breeze from the west.",
    "A man is riding a bicycle down a busy street in the city.",
    "Question: what is shown in the picture? Answer: a dog playing with a ball.",
    "The chart shows the number of visitors per month, rising from March to July.",
    "Left, right, top, bottom, center, above, below, beside, between.",
    "USER: What is in the image? ASSISTANT: A green square and a red circle.",
]

SPECIAL_TOKENS = {
    "llava": {"eos": "</s>", "pad": "<pad>", "bos": "<s>", "extra": ["<image>"]},
    "qwen2_vl": {"eos": "<|im_end|>", "pad": "<|endoftext|>", "bos": None,
                 "extra": ["<|im_start|>", "<|vision_start|>", "<|image_pad|>", "<|video_pad|>",
                           "<|vision_end|>"]},
    "llava_onevision": {"eos": "<|im_end|>", "pad": "<|endoftext|>", "bos": None,
                        "extra": ["<|im_start|>", "<image>", "<video>"]},
}
for _family in QWEN_VL[1:]:
    SPECIAL_TOKENS[_family] = SPECIAL_TOKENS["qwen2_vl"]

# A content item is {"type": "image"} or {"type": "text", "text": ...}; content may be a string.
# Whitespace that matters is written as string literals so Jinja's trimming cannot eat it.
_CONTENT = ("{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
            "{%- for c in m['content'] -%}"
            "{%- if c['type'] == 'image' -%}{{ IMAGE }}{%- elif c['type'] == 'text' -%}"
            "{{ c['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}")

CHAT_TEMPLATES = {
    # LLaVA-1.5 style: "USER: <image>\nWhat is it? ASSISTANT:"
    "llava": ("{%- for m in messages -%}{{ m['role'] | upper + ': ' }}"
              + _CONTENT.replace("IMAGE", "'<image>\\n'")
              + "{%- if m['role'] == 'assistant' -%}{{ '</s>' }}{%- endif -%}{{ ' ' }}"
              "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"),
    # ChatML as in Qwen2-VL, without the default system turn
    "qwen2_vl": ("{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' }}"
                 + _CONTENT.replace("IMAGE", "'<|vision_start|><|image_pad|><|vision_end|>'")
                 + "{{ '<|im_end|>\\n' }}{%- endfor -%}"
                 "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"),
}
# ChatML as in LLaVA-OneVision, the image placeholder before the text
CHAT_TEMPLATES["llava_onevision"] = CHAT_TEMPLATES["qwen2_vl"].replace(
    "'<|vision_start|><|image_pad|><|vision_end|>'", "'<image>\\n'")
for _family in QWEN_VL[1:]:
    CHAT_TEMPLATES[_family] = CHAT_TEMPLATES["qwen2_vl"]


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")


def train_tokenizer(corpus: list[str], vocab_size: int = 512,
                    family: str = "llava") -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``corpus`` with ``family``'s special tokens and chat template.

    Special tokens get the first ids (in ``SPECIAL_TOKENS`` order), so every tokenizer of one
    family agrees on them whatever the corpus."""
    _check_family(family)
    spec = SPECIAL_TOKENS[family]
    specials = [t for t in (spec["pad"], spec["eos"], spec["bos"]) if t] + spec["extra"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=spec["eos"],
                                   pad_token=spec["pad"], bos_token=spec["bos"],
                                   additional_special_tokens=spec["extra"])
    fast.chat_template = CHAT_TEMPLATES[family]
    return fast


# ---------------------------------------------------------------------------- processors

# Image token counts stay small. LLaVA: every image is resized and cropped to 32 x 32, in
# 8 x 8 patches -> 16 tokens. Qwen2-VL keeps the aspect ratio (area between 16^2 and 48^2 pixels,
# sides multiples of 8): a 32 x 32 image has 8 x 8 patches of 4, merged 2 x 2 -> 16 tokens.
LLAVA_IMAGE_SIZE, LLAVA_PATCH = 32, 8
QWEN_PATCH, QWEN_MERGE = 4, 2


def llava_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    size = LLAVA_IMAGE_SIZE
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size},
                                            crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=LLAVA_PATCH, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=tokenizer.chat_template)


QWEN_PROCESSORS = {"qwen2_vl": Qwen2VLImageOnlyProcessor, "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
                   "qwen3_vl": Qwen3VLImageOnlyProcessor}


def qwen2_vl_processor(tokenizer: PreTrainedTokenizerFast, family: str = "qwen2_vl") -> Any:
    """The image-only processor of a Qwen-VL ``family`` (all three share the image processor)."""
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=QWEN_PATCH, merge_size=QWEN_MERGE, temporal_patch_size=2,
        size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48})
    return QWEN_PROCESSORS[family](image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=tokenizer.chat_template)


# LLaVA-OneVision: 16 x 16 tiles in 4 x 4 patches (16 features a tile); the grid pinpoints give
# 1 to 4 tiles by aspect ratio, so a 32 x 32 image has 16 + 64 features + 8 newlines.
OV_TILE, OV_PATCH = 16, 4
OV_PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32], [16, 48], [48, 16]]


def llava_onevision_processor(tokenizer: PreTrainedTokenizerFast
                              ) -> LlavaOnevisionImageOnlyProcessor:
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": OV_TILE, "width": OV_TILE}, image_grid_pinpoints=OV_PINPOINTS,
        do_pad=True)
    return LlavaOnevisionImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        num_image_tokens=(OV_TILE // OV_PATCH) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", chat_template=tokenizer.chat_template)


def make_processor(family: str, tokenizer: PreTrainedTokenizerFast) -> Any:
    """The tiny processor of ``family`` over ``tokenizer``."""
    _check_family(family)
    if family == "llava":
        return llava_processor(tokenizer)
    if family == "llava_onevision":
        return llava_onevision_processor(tokenizer)
    return qwen2_vl_processor(tokenizer, family)


# ---------------------------------------------------------------------------- configs

def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int | None]:
    return {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}


def llama_config(tokenizer: PreTrainedTokenizerFast, *, layers: int = 4, width: int = 128,
                 heads: int = 4, init_std: float = 0.1) -> LlamaConfig:
    """A Llama LM (also LLaVA's language model) with grouped-query attention (heads / 2)."""
    return LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                       max_position_embeddings=1024, initializer_range=init_std,
                       **_special_ids(tokenizer))


def llava_config(tokenizer: PreTrainedTokenizerFast, *, layers: int = 4, width: int = 128,
                 heads: int = 4, vision_layers: int = 2, vision_width: int = 32,
                 init_std: float = 0.1) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=2 * vision_width,
                              num_hidden_layers=vision_layers, num_attention_heads=2,
                              image_size=LLAVA_IMAGE_SIZE, patch_size=LLAVA_PATCH,
                              projection_dim=vision_width)
    text = llama_config(tokenizer, layers=layers, width=width, heads=heads, init_std=init_std)
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                       image_seq_length=(LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2,
                       vision_feature_select_strategy="default", vision_feature_layer=-2,
                       projector_hidden_act="gelu", tie_word_embeddings=False)


def qwen2_config(tokenizer: PreTrainedTokenizerFast, *, layers: int = 4, width: int = 128,
                 heads: int = 4, init_std: float = 0.1) -> Qwen2Config:
    return Qwen2Config(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                       max_position_embeddings=1024, initializer_range=init_std,
                       tie_word_embeddings=False, **_special_ids(tokenizer))


def qwen2_vl_config(tokenizer: PreTrainedTokenizerFast, *, layers: int = 4, width: int = 128,
                    heads: int = 4, vision_layers: int = 2, vision_width: int = 32,
                    init_std: float = 0.1) -> Qwen2VLConfig:
    """``mrope_section`` splits head_dim / 2 rotary frequencies over (time, height, width)."""
    half = width // heads // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    ids = tokenizer.convert_tokens_to_ids
    vision = {"depth": vision_layers, "embed_dim": vision_width, "hidden_size": width,
              "num_heads": 2, "mlp_ratio": 2, "patch_size": QWEN_PATCH,
              "spatial_merge_size": QWEN_MERGE, "temporal_patch_size": 2}
    text = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2),
            "max_position_embeddings": 1024, "initializer_range": init_std,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": section},
            **_special_ids(tokenizer)}
    return Qwen2VLConfig(text_config=text, vision_config=vision,
                         image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                         vision_start_token_id=ids("<|vision_start|>"),
                         vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)


def qwen3_config(tokenizer: PreTrainedTokenizerFast, *, layers: int = 4, width: int = 128,
                 heads: int = 4, init_std: float = 0.1) -> Qwen3Config:
    return Qwen3Config(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                       head_dim=width // heads, max_position_embeddings=1024,
                       initializer_range=init_std, tie_word_embeddings=False,
                       **_special_ids(tokenizer))


def _qwen_vl_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"),
            "vision_end_token_id": ids("<|vision_end|>")}


def _qwen_text(tokenizer: PreTrainedTokenizerFast, layers: int, width: int, heads: int,
               init_std: float, section: list[int], **rope: Any) -> dict[str, Any]:
    return {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2),
            "max_position_embeddings": 1024, "initializer_range": init_std, "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": section, **rope},
            **_special_ids(tokenizer)}


def qwen2_5_vl_config(tokenizer: PreTrainedTokenizerFast, *, layers: int = 4, width: int = 128,
                      heads: int = 4, vision_layers: int = 2, vision_width: int = 32,
                      init_std: float = 0.1) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B's keys: window attention (``window_size`` pixels) except in the
    ``fullatt_block_indexes`` blocks, an MLP merger to ``out_hidden_size``; Qwen2-VL's M-RoPE."""
    half = width // heads // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    vision = {"depth": vision_layers, "hidden_size": vision_width, "hidden_act": "silu",
              "intermediate_size": 2 * vision_width, "num_heads": 2, "in_chans": 3,
              "out_hidden_size": width, "patch_size": QWEN_PATCH,
              "spatial_merge_size": QWEN_MERGE, "spatial_patch_size": QWEN_PATCH,
              "window_size": 2 * QWEN_PATCH * QWEN_MERGE,
              "fullatt_block_indexes": [vision_layers - 1], "tokens_per_second": 2,
              "temporal_patch_size": 2}
    text = _qwen_text(tokenizer, layers, width, heads, init_std, section)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                            **_qwen_vl_ids(tokenizer))


def qwen3_vl_config(tokenizer: PreTrainedTokenizerFast, *, layers: int = 4, width: int = 128,
                    heads: int = 4, vision_layers: int = 2, vision_width: int = 32,
                    init_std: float = 0.1) -> Qwen3VLConfig:
    """Qwen3-VL-8B's keys: interleaved M-RoPE (``mrope_interleaved``; the section still sums to
    head_dim / 2), QK-norm Qwen3 layers with an explicit ``head_dim``, and DeepStack: the
    features of vision blocks ``deepstack_visual_indexes`` join decoder layers 0, 1, ..."""
    half = width // heads // 2
    section = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]  # 8B: 24, 20, 20
    vision = {"depth": vision_layers, "hidden_size": vision_width,
              "hidden_act": "gelu_pytorch_tanh", "intermediate_size": 2 * vision_width,
              "num_heads": 2, "in_channels": 3, "out_hidden_size": width,
              "patch_size": QWEN_PATCH, "spatial_merge_size": QWEN_MERGE,
              "temporal_patch_size": 2, "num_position_embeddings": 144,
              "deepstack_visual_indexes": list(range(vision_layers)), "initializer_range": init_std}
    text = {**_qwen_text(tokenizer, layers, width, heads, init_std, section,
                         mrope_interleaved=True),
            "head_dim": width // heads, "attention_bias": False}
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                         **_qwen_vl_ids(tokenizer))


def llava_onevision_config(tokenizer: PreTrainedTokenizerFast, *, layers: int = 4,
                           width: int = 128, heads: int = 4, vision_layers: int = 2,
                           vision_width: int = 32, init_std: float = 0.1
                           ) -> LlavaOnevisionConfig:
    """llava-onevision-qwen2-7b-ov-hf's keys: SigLIP tower (no head), "full" features of the
    last layer, ``image_grid_pinpoints`` tiles, ``anyres_max_9``, a learned image newline."""
    ids = tokenizer.convert_tokens_to_ids
    vision = SiglipVisionConfig(hidden_size=vision_width, intermediate_size=2 * vision_width,
                                num_hidden_layers=vision_layers, num_attention_heads=2,
                                image_size=OV_TILE, patch_size=OV_PATCH, vision_use_head=False)
    text = qwen2_config(tokenizer, layers=layers, width=width, heads=heads, init_std=init_std)
    return LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                image_token_index=ids("<image>"), video_token_index=ids("<video>"),
                                image_grid_pinpoints=OV_PINPOINTS, projector_hidden_act="gelu",
                                vision_feature_select_strategy="full", vision_feature_layer=-1,
                                vision_aspect_ratio="anyres_max_9",
                                use_image_newline_parameter=True, tie_word_embeddings=False)


# family -> (VLM class, VLM config builder, text-only LM class, LM config builder)
TINY_FAMILIES = {
    "llava": (LlavaForConditionalGeneration, llava_config, LlamaForCausalLM, llama_config),
    "qwen2_vl": (Qwen2VLForConditionalGeneration, qwen2_vl_config, Qwen2ForCausalLM,
                 qwen2_config),
    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, qwen2_5_vl_config, Qwen2ForCausalLM,
                   qwen2_config),
    "qwen3_vl": (Qwen3VLForConditionalGeneration, qwen3_vl_config, Qwen3ForCausalLM,
                 qwen3_config),
    "llava_onevision": (LlavaOnevisionForConditionalGeneration, llava_onevision_config,
                        Qwen2ForCausalLM, qwen2_config),
}


# ---------------------------------------------------------------------------- the suite

def tiny_image(seed: int, width: int = 32, height: int = 32) -> Image.Image:
    """A deterministic RGB test image: a coloured rectangle on random noise."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    x, y = rng.integers(0, width // 2), rng.integers(0, height // 2)
    pixels[y:y + height // 3, x:x + width // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
    return Image.fromarray(pixels)


def tiny_prompts() -> list[tuple[str, list[Image.Image]]]:
    """Deterministic (text, images) requests: one image, a non-square image, two images, none."""
    return [("What is in the image?", [tiny_image(0)]),
            ("Describe the picture in detail.", [tiny_image(1, 48, 32)]),
            ("Compare the two images.", [tiny_image(2), tiny_image(3)]),
            ("Tell me a story about a red circle.", [])]


def build_tiny_models(family: str, seed: int = 0,
                      tokenizer: PreTrainedTokenizerFast | None = None, target_layers: int = 4,
                      ) -> tuple[dict[str, PreTrainedModel], Any, PreTrainedTokenizerFast]:
    """In-memory ``({target, draft_vlm, text_only}, processor, tokenizer)`` for ``family``,
    with random weights seeded by ``seed`` (+1, +2 for the drafts)."""
    _check_family(family)
    tok = tokenizer or train_tokenizer(CORPUS, 512, family)
    vlm, vlm_config, lm, lm_config = TINY_FAMILIES[family]
    processor = make_processor(family, tok)
    classes = (vlm, vlm, lm)
    cfgs = (vlm_config(tok, layers=target_layers), vlm_config(tok, layers=1, width=64, heads=2),
            lm_config(tok, layers=1, width=64, heads=2))
    built = {}
    for i, (role, cls, cfg) in enumerate(zip(ROLES, classes, cfgs)):
        torch.manual_seed(seed + i)
        built[role] = cls(cfg).eval()
    return built, processor, tok


def build_tiny_suite(root: Path, family: str, seed: int = 0,
                     tokenizer: PreTrainedTokenizerFast | None = None,
                     target_layers: int = 4) -> dict[str, Path]:
    """Build and save ``{target, draft_vlm, text_only}`` under ``root``; return their paths
    (``root / f"{family}_{role}"``). VLM directories hold the processor, the LM its tokenizer."""
    built, processor, tok = build_tiny_models(family, seed, tokenizer, target_layers)
    paths = {}
    for role, model in built.items():
        paths[role] = Path(root) / f"{family}_{role}"
        model.save_pretrained(paths[role])
        (tok if role == "text_only" else processor).save_pretrained(paths[role])
    return paths


def small_vocab_tokenizer(family: str, words: int = 8) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with ``family``'s special tokens, [UNK] and ``words`` plain words
    ("w0", "w1", ...): a vocabulary of 12-16 ids, so that a random model's next-token
    distribution is spread over a few tokens that target and draft share (for exact
    statistical tests of sampling). Text outside the words maps to [UNK]."""
    _check_family(family)
    spec = SPECIAL_TOKENS[family]
    specials = [t for t in (spec["pad"], spec["eos"], spec["bos"]) if t] + spec["extra"]
    vocab = {t: i for i, t in enumerate(specials + ["[UNK]"] + [f"w{i}" for i in range(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=spec["eos"],
                                   pad_token=spec["pad"], bos_token=spec["bos"], unk_token="[UNK]",
                                   additional_special_tokens=spec["extra"])
    fast.chat_template = CHAT_TEMPLATES[family]
    return fast

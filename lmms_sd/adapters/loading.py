"""Load a checkpoint (local folder or hub id) as an adapter, choosing the family from
``config.model_type``.

Before anything is allocated the checkpoint is inspected (``inspect_checkpoint``): its
config.json and the names and shapes of its stored tensors (safetensors headers, or a
memory-mapped ``pytorch_model.bin``). An EAGLE/MSD head, an original-format LLaVA checkpoint,
an unknown model type and a config whose model would be larger than the stored weights (i.e.
built partly from config defaults and random init) are errors that name the fix.

dtype ``"auto"``: float32 on the CPU; on a GPU the checkpoint's ``torch_dtype`` (llava-hf
float16, Qwen2-VL bfloat16; float32 when it names none). ``device_map`` (``"auto"``,
``"balanced"``, ...) places the model with accelerate's big-model inference over the GPUs in
``max_memory`` instead of moving it to ``device``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .base import HFAdapter
from .causal_lm import CausalLMAdapter
from .hub import resolve_folder
from .llava import LlavaAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter

# config ``model_type`` -> (the transformers model class, our adapter). A family is one adapter
# file and one entry here (plus its class-name prefix in ``lmms_eval/names.py``).
VLM_FAMILIES = {
    "llava": (LlavaForConditionalGeneration, LlavaAdapter),
    "qwen2_vl": (Qwen2VLForConditionalGeneration, Qwen2VLAdapter),
    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLAdapter),
    "qwen3_vl": (Qwen3VLForConditionalGeneration, Qwen3VLAdapter),
    "llava_onevision": (LlavaOnevisionForConditionalGeneration, LlavaOnevisionAdapter),
}
ROLES = ("target", "draft")
DTYPES = ("float32", "bfloat16", "float16")
COVERAGE = 0.99  # stored parameters / parameters the config describes, at least


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint folder holds, read without building a model."""

    folder: Path
    source: str                         # as the user wrote it
    config: dict[str, Any]              # config.json
    shapes: dict[str, tuple[int, ...]]  # stored tensor name -> shape
    kind: str                           # "llava", "qwen2_vl", "causal_lm" or "msd_head"

    @property
    def stored_parameters(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes.values())


# ---------------------------------------------------------------------------- inspection

def _config(folder: Path, source: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no model at {source!r}: {path} does not exist")
    return json.loads(path.read_text())


def model_type(path: str | Path, revision: str | None = None) -> str:
    return str(_config(resolve_folder(path, revision), str(path)).get("model_type"))


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors stored in ``folder`` (single or sharded safetensors or
    ``pytorch_model*.bin``), without reading their data."""
    from safetensors import safe_open
    shapes: dict[str, tuple[int, ...]] = {}
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})  # noqa: SIM118
    if not files:
        for f in sorted(folder.glob("pytorch_model*.bin")):
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            shapes.update({k: tuple(v.shape) for k, v in state.items()})
    return shapes


def _is_head(shapes: dict[str, tuple[int, ...]]) -> bool:
    """EAGLE/MSD head layout: ``fc`` over [embedding; feature] and bare ``layers.N``."""
    return "fc.weight" in shapes and any(k.startswith("layers.0.") for k in shapes)


def inspect_checkpoint(source: str | Path, revision: str | None = None) -> CheckpointInfo:
    folder = resolve_folder(source, revision)
    config, shapes = _config(folder, str(source)), tensor_shapes(folder)
    kind = config.get("model_type")
    if _is_head(shapes):
        kind = "msd_head"
    elif kind == "llava" and "text_config" not in config:
        raise ValueError(f"{source}: an original-format LLaVA checkpoint "
                         f"({config.get('architectures')}, no text_config), which transformers "
                         "cannot load; use the llava-hf conversion (e.g. llava-hf/llava-1.5-7b-hf)")
    elif kind not in VLM_FAMILIES:
        if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(f"unsupported model type {kind!r} at {str(source)!r}: expected one "
                             f"of {sorted(VLM_FAMILIES)} or a causal LM type of "
                             "AutoModelForCausalLM")
        kind = "causal_lm"
    if not shapes:
        raise FileNotFoundError(f"{source}: {folder} holds a config.json but no weights "
                                "(*.safetensors or pytorch_model*.bin)")
    return CheckpointInfo(folder, str(source), config, shapes, kind)


def _described_parameters(model_cls: Any, config: Any) -> int:
    """Parameters of the model ``config`` describes, built on the meta device (no memory)."""
    from accelerate import init_empty_weights
    with init_empty_weights():
        model = model_cls(config)
    model.tie_weights()  # tied embeddings are stored once (outside: the context re-creates them)
    return sum(p.numel() for p in model.parameters())


def check_covered(info: CheckpointInfo, model_cls: Any, config: Any) -> None:
    """Raise unless the stored weights cover the model the config describes: a config whose
    sizes are not those of its weights would build the rest from defaults at random."""
    described, stored = _described_parameters(model_cls, config), info.stored_parameters
    if stored < COVERAGE * described:
        raise ValueError(f"{info.source}: its weights hold {stored / 1e6:.1f}M parameters but "
                         f"its config describes a {model_cls.__name__} of {described / 1e6:.1f}M;"
                         " loading it would initialise the rest at random from config "
                         "defaults. Is it the checkpoint you meant, with its own config.json?")


# ---------------------------------------------------------------------------- dtype

def resolve_dtype(dtype: str | torch.dtype | None, config: dict[str, Any],
                  device: str | torch.device) -> torch.dtype:
    """``"auto"``/None: float32 on the CPU, the checkpoint's ``torch_dtype`` on a GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {DTYPES}, got {dtype!r}")
        return getattr(torch, dtype)
    if torch.device(device).type == "cpu":
        return torch.float32
    text = config.get("text_config") or {}
    name = (config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype")
            or text.get("dtype"))
    return getattr(torch, name) if name in DTYPES else torch.float32


# ---------------------------------------------------------------------------- loading

def load_processor(path: str | Path, revision: str | None = None) -> Any:
    """The processor saved beside a model (a VLM family's ``processor_class``: the Qwen-VL
    and OneVision ones without their video processors); the tokenizer for any other model
    type."""
    folder = resolve_folder(path, revision)
    kind = _config(folder, str(path)).get("model_type")
    if kind == "llava":
        return LlavaProcessor.from_pretrained(folder, **_llava_processor_fixes(folder))
    if kind in VLM_FAMILIES:
        return VLM_FAMILIES[kind][1].processor_class.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def _llava_processor_fixes(folder: Path) -> dict[str, Any]:
    """transformers 5's LlavaProcessor defaults ``num_additional_image_tokens`` to 0; older
    llava-hf processor configs lack the key, which gives 575 placeholders for CLIP's 576
    features. A CLIP tower with the "default" strategy drops its CLS token: 1."""
    saved = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (folder / name).is_file():
            saved.update(json.loads((folder / name).read_text()))
    config = _config(folder, str(folder))
    vision = config.get("vision_config") or {}
    if "num_additional_image_tokens" in saved or vision.get("model_type") != "clip_vision_model":
        return {}
    return {"num_additional_image_tokens": 1}


def load_adapter(path: str | Path, *, revision: str | None = None,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "auto",
                 attn_implementation: str | None = None, device_map: str | None = None,
                 max_memory: dict[int | str, int | str] | None = None, role: str = "target",
                 family: str | None = None) -> HFAdapter:
    """A LLaVA / Qwen2-VL adapter, or a causal-LM adapter for any model type that
    ``AutoModelForCausalLM`` knows. ``family``: the VLM family a target must be (checked before
    anything is allocated). ``role`` only documents intent ("target" or "draft")."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    info = inspect_checkpoint(path, revision)
    _check_role(info, role, family)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, info.config, device)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory)
    if info.kind in VLM_FAMILIES:
        model_cls, adapter_cls = VLM_FAMILIES[info.kind]
    else:
        model_cls, adapter_cls = AutoModelForCausalLM, CausalLMAdapter
    config = AutoConfig.from_pretrained(info.folder)
    check_covered(info, model_cls if info.kind in VLM_FAMILIES
                  else AutoModelForCausalLM._model_mapping[type(config)], config)
    model = model_cls.from_pretrained(info.folder, **kwargs)
    if device_map is None:
        model = model.to(device)
    processor = load_processor(info.folder) if info.kind in VLM_FAMILIES \
        else AutoTokenizer.from_pretrained(info.folder)
    return adapter_cls(model, processor)


def _check_role(info: CheckpointInfo, role: str, family: str | None) -> None:
    if info.kind == "msd_head":
        fix = (f"give it to {family}_msd as msd_model_path=" if family
               else "load it with lmms_sd.drafters.msd_format.load_msd_head")
        raise ValueError(f"{info.source} is an EAGLE/MSD draft head (fc + "
                         f"{info.config.get('num_hidden_layers', '?')} layer(s)), not a model: "
                         f"{fix}")
    if family is None:
        return
    if role == "target" and info.kind != family:
        what = ("a text-only language model" if info.kind == "causal_lm"
                else f"a {info.kind} checkpoint")
        raise ValueError(f"{info.source} is {what} (model_type {info.config.get('model_type')!r})"
                         f"; a {family}_* class needs a {family} target (a {family} VLM) as "
                         "pretrained= (a text-only LM can serve as draft=)")
    if role == "draft" and info.kind not in (family, "causal_lm"):
        raise ValueError(f"{info.source} is a {info.kind} checkpoint; a {family} target takes a "
                         f"{family} draft VLM or a text-only causal LM as draft=")


# ---------------------------------------------------------------------------- vocabularies

def check_same_vocab(target: HFAdapter, draft: HFAdapter) -> None:
    """Raise unless the draft's token ids mean the same tokens as the target's.

    Rules (real pairs: llava-hf's tokenizer adds ``<image>`` 32000 and ``<pad>`` 32001 to
    Vicuna's 32000 tokens, and its embedding has 32064 rows; Qwen2-VL-7B has 152064 rows and
    2B 151936 over the same tokenizer):
      - every id both tokenizers have maps to the same token;
      - ids only one side has must be added (special) tokens placed after the other side's
        ids;
      - the draft tokenizer has no token at an id the target's logits do not cover.
    Logit rows beyond a tokenizer are padding: a draft with fewer rows than the target gets
    -inf there, one with more has its extra (padding) rows dropped (``ModelDrafter``)."""
    t_vocab, d_vocab = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    t_ids = {i: t for t, i in t_vocab.items()}
    d_ids = {i: t for t, i in d_vocab.items()}
    differ = [(i, t_ids[i], d_ids[i]) for i in sorted(t_ids.keys() & d_ids.keys())
              if t_ids[i] != d_ids[i]]
    if differ:
        raise ValueError(f"target and draft tokenizers differ on {len(differ)} shared ids "
                         f"(id, target token, draft token: {differ[:5]}); they must map tokens "
                         "to the same ids")
    for name, tok, own, other in (("target", target.tokenizer, t_ids, d_ids),
                                  ("draft", draft.tokenizer, d_ids, t_ids)):
        extra = sorted(own.keys() - other.keys())
        added = set(tok.added_tokens_decoder)
        bad = [i for i in extra if i not in added or (other and i < max(other))]
        if bad:
            raise ValueError(f"target and draft tokenizers differ: the {name} has tokens the "
                             f"other lacks that are not added tokens after its ids: "
                             f"{[(i, own[i]) for i in bad[:5]]}")
    beyond = [i for i in d_ids if i >= target.vocab_size]
    if beyond:
        raise ValueError(f"the draft tokenizer has tokens at ids the target's {target.vocab_size} "
                         f"logit rows do not cover: {[(i, d_ids[i]) for i in beyond[:5]]}")

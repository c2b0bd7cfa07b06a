"""Reading and writing MSD / EAGLE-2 draft heads in the published (EAGLE) checkpoint layout.

What the published format is (read from the sources, 2025-05 snapshot of Lyn-Lucy/MSD):
  https://github.com/Lyn-Lucy/MSD/blob/main/EAGLE/eagle/model/cnets.py          (the head)
  https://github.com/Lyn-Lucy/MSD/blob/main/EAGLE/eagle/model/ea_model.py       (the loader)
  https://github.com/Lyn-Lucy/MSD/blob/main/EAGLE/eagle/model/ea_llama_model.py (Llama layer)
  https://github.com/Lyn-Lucy/MSD/blob/main/EAGLE/eagle/model/ea_qwen2vl_model.py (Qwen2-VL layer)
  https://github.com/Lyn-Lucy/MSD/blob/main/EAGLE/eagle/train/main_deepspeed.py (training, saving)
  https://github.com/Lyn-Lucy/MSD/blob/main/EAGLE/eagle/train/llava_v15_7B_config.json
  (and llava_v15_13B_config.json, qwen2vl_config.json beside it)
  https://github.com/Lyn-Lucy/MSD/blob/main/EAGLE/eagle/ge_data/ge_data_all_llava15.py (+ _qwen2vl)
  https://github.com/SafeAILab/EAGLE/blob/main/eagle/model/ea_model.py, eagle/train/main.py
The Hugging Face repos lucylyn/MSD-LLaVA1.5-7B, -13B and MSD-Qwen2VL-7B-Instruct could not be read
from here (no hub access); their layout below is inferred from the code that writes and reads them.

Files. A folder (or hub repo, ``lmms_sd.adapters.hub``) with ``config.json`` and one weight
file: ``pytorch_model.bin`` (a plain ``torch.save`` state dict; MSD's trainer writes it with DeepSpeed's
``save_16bit_model``, so bf16 tensors) or, failing that, ``model.safetensors``; the loaders try
them in that order. EAGLE's loader also reads ``config.json`` for a top-level ``"bias"`` flag
(fc bias; default true).

config.json. The training config copied verbatim: MSD's LLaVA heads carry LLaVA's own config
with ``"num_hidden_layers": 1`` (``model_type "llava"``, hidden 4096 / 5120, heads 32 / 40,
intermediate 11008 / 13824, ``rms_norm_eps`` 1e-5, no rope_theta: base 10000, ``vocab_size``
32000, the original liuhaotian vocabulary); the Qwen2-VL head carries Qwen2-VL-7B's (model_type
"qwen2_vl", hidden 3584, 28 heads, 4 kv heads, intermediate 18944, eps 1e-6, rope_theta 1e6,
``rope_scaling {"type": "mrope", "mrope_section": [16, 24, 24]}``, vocab 152064). MSD picks the
layer class from ``model_type``: "llava" -> Llama layer, "qwen2_vl" -> Qwen2-VL layer. EAGLE's
text heads use ``model_type "llama"``.

State dict keys (``cnets.Model``; no final norm, no lm_head):
  fc.weight [H, 2H], fc.bias [H]
  layers.0.self_attn.{q,k,v,o}_proj.weight   (Qwen2-VL: also q/k/v_proj.bias)
  layers.0.mlp.{gate,up,down}_proj.weight
  layers.0.post_attention_layernorm.weight
  layers.0.input_layernorm.weight            ONLY for Qwen2-VL: EAGLE's Llama layer 0 has none
  embed_tokens.weight [V, H]                 the target's embedding, frozen during training
Rotary ``inv_freq`` buffers are non-persistent (old EAGLE files may still hold
``...rotary_emb.inv_freq``: ignored). ``embed_tokens.weight`` must be in the published files:
the original loaders build a fresh ``nn.Embedding`` and call ``load_state_dict(strict=False)``,
so a file without it would draft from random embeddings. We accept files with or without it,
check it against the target when present, and always write it (so the original code can load
what we save).

How the head consumes its inputs (cnets.Model.forward / topK_genrate): the target's tokens are
shifted by one, so slot p pairs token x_p with the target feature f_{p-1};
``fc(cat((inputs_embeds, hidden_states), -1))``: token embedding FIRST, feature second. The
features are the target's last hidden state AFTER the final norm (``base_model.model(...)[0]`` at
inference, ``hidden_states[-1]`` in data generation; both normed). Modality decoupling: at the
image positions of the prompt the fc output is overwritten by the target's projected visual
embeddings (``new_hidden_state[indice:indice+n] = temp_image_tensor``), so no feature is used
there. While drafting, a node's feature is its parent's head output. Draft logits are the
target's ``lm_head`` applied to the head output (no norm in between).

Positions. Llama: 1-D RoPE over the expanded sequence (images count 576 positions); only
differences matter, so any constant offset is equivalent. Qwen2-VL: the head's M-RoPE gets 1-D
``arange`` positions copied to all three sections, both in training and at inference, and MSD
verifies the target tree with 1-D positions too (``tree_decoding``: ``tree_position_ids +
input_ids.shape[1]``, no rope delta), which differs from the target's true M-RoPE. A head runs
with the scheme it was trained with: ``save_msd_head`` records ``MSDHead.positions`` in the
config (``lmms_sd_positions``); a config without that key written by Hugging Face (it carries
``transformers_version``, as MSD's published configs do) gets its publisher's scheme
(``PUBLISHED_POSITIONS``: ``sequential`` for MSD-Qwen2VL), and one written by lmms_sd before the
key existed (no ``transformers_version``) gets ``target``, which our trainer defaulted to.
``MSDConfig.positions`` (model arg ``positions=``) overrides it. Verification always uses the
target adapter's true positions, so either choice is lossless. Note also that MSD's Qwen2-VL training data
(ge_data_all_qwen2vl.py) ran the target on ``input_ids`` alone, without ``pixel_values``: the
features it learned from did not see the image.

Vocabulary. The head has no vocabulary of its own: it uses the target's ``embed_tokens`` and
``lm_head``. Original LLaVA-1.5 has 32000 tokens (the image is a -200 placeholder); llava-hf pads
to 32064 (32000 "<image>", 32001 "<pad>", then padding rows). Rule here: a checkpoint vocabulary
larger than the target's is an error; a smaller one is accepted and the ids at or above it get
-inf draft logits (``MSDHead.vocab_limit``): the head never proposes a token it was not trained
on, and the target's lm_head rows for ids < 32000 are LLaVA's own.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel

from .msd_head import MROPE_KINDS, POSITION_SCHEMES, MSDHead, layer_kind

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")  # the order EAGLE's loader tries
# checkpoint ``model_type`` -> layer kind ("llava" and "qwen2_vl" are MSD's; "llama" is EAGLE's;
# the later families' heads are written by lmms_sd in the same layout under the target's type)
CHECKPOINT_KINDS = {"llava": "llama", "llama": "llama", "qwen2_vl": "qwen2_vl",
                    "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl",
                    "llava_onevision": "qwen2", "qwen2": "qwen2"}
WRITTEN_MODEL_TYPE = {"llama": "llava", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl",
                      "qwen3_vl": "qwen3_vl", "qwen2": "llava_onevision"}
WRITTEN_ARCHITECTURE = {"llama": "LlavaLlamaForCausalLM",
                        "qwen2_vl": "Qwen2VLForConditionalGeneration",
                        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                        "qwen3_vl": "Qwen3VLForConditionalGeneration",
                        "qwen2": "LlavaOnevisionForConditionalGeneration"}
EMBED_KEY = "embed_tokens.weight"
POSITIONS_KEY = "lmms_sd_positions"
# MSD's cnets.py: 1-D arange for Qwen2-VL; no published heads of the later kinds: their own
PUBLISHED_POSITIONS = {"llama": "target", "qwen2_vl": "sequential", "qwen2_5_vl": "target",
                       "qwen3_vl": "target", "qwen2": "target"}
EMBED_TOLERANCE = 1e-2  # relative to the largest |weight|: survives bf16/fp16 storage only


@dataclass(frozen=True)
class MSDCheckpoint:
    config: dict[str, Any]           # config.json as stored
    state_dict: dict[str, Tensor]
    source: str


# ---------------------------------------------------------------------------- reading

def _locate(source: str | Path, revision: str | None = None) -> tuple[Path, Path]:
    """(config.json, weight file) of a head in a local folder or a hub repo (``ORG/NAME``,
    ``@REV``), read before any tensor is loaded: a full model given as a head is an error."""
    from ..adapters.hub import resolve_folder
    folder = resolve_folder(source, revision)
    found = [folder / f for f in WEIGHT_FILES if (folder / f).is_file()]
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{source} is not an EAGLE/MSD head: {folder} has no {CONFIG_FILE}")
    if not found:
        raise FileNotFoundError(f"{source} is not an EAGLE/MSD head: it holds no single "
                         f"{' or '.join(WEIGHT_FILES)} (a sharded full model?); a draft model "
                         "goes to the *_sd classes as draft=")
    _check_head_keys(source, found[0])
    return folder / CONFIG_FILE, found[0]


def _check_head_keys(source: str | Path, weights: Path) -> None:
    """The stored tensor names must be a head's (``fc`` + ``layers.N``), not a model's."""
    from ..adapters.loading import tensor_shapes
    keys = set(tensor_shapes(weights.parent))
    if "fc.weight" not in keys:
        example = sorted(keys)[:3]
        raise ValueError(f"{source} is not an EAGLE/MSD head (no fc.weight; stored tensors such "
                         f"as {example}): a draft model goes to the *_sd classes as draft=, an "
                         "MSD head to the *_msd classes as msd_model_path=")


def read_checkpoint(source: str | Path, revision: str | None = None) -> MSDCheckpoint:
    config_path, weight_path = _locate(source, revision)
    config = json.loads(config_path.read_text())
    if weight_path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(weight_path))
    else:
        state = torch.load(weight_path, map_location="cpu", weights_only=True)
    return MSDCheckpoint(config, dict(state), str(source))


# ---------------------------------------------------------------------------- validation

def _checkpoint_kind(ckpt: MSDCheckpoint) -> str:
    model_type = ckpt.config.get("model_type")
    if model_type not in CHECKPOINT_KINDS:
        raise ValueError(f"{ckpt.source}: config model_type {model_type!r} is not an MSD/EAGLE "
                         f"head type; expected one of {sorted(CHECKPOINT_KINDS)}")
    return CHECKPOINT_KINDS[model_type]


def check_against_target(ckpt: MSDCheckpoint, target_config: PretrainedConfig) -> None:
    """Clear errors when a checkpoint cannot serve this target's language model."""
    cfg, src = ckpt.config, ckpt.source
    kind, target_kind = _checkpoint_kind(ckpt), layer_kind(target_config)
    if kind != target_kind:
        raise ValueError(f"{src} holds a {kind} head (model_type {cfg['model_type']!r}) but the "
                         f"target's language model is {target_config.model_type!r} ({target_kind})")
    if cfg.get("hidden_size") != target_config.hidden_size:
        raise ValueError(f"{src} has hidden_size {cfg.get('hidden_size')}, the target has "
                         f"{target_config.hidden_size}")
    vocab = cfg.get("vocab_size", target_config.vocab_size)
    if vocab > target_config.vocab_size:
        raise ValueError(f"{src} has vocab_size {vocab}, larger than the target's "
                         f"{target_config.vocab_size}: they cannot share token ids")
    if cfg.get("num_hidden_layers", 1) < 1:
        raise ValueError(f"{src} has num_hidden_layers {cfg.get('num_hidden_layers')}")
    rope = target_config.rope_parameters or {}
    theta = cfg.get("rope_theta")
    if theta is not None and float(theta) != float(rope.get("rope_theta", theta)):
        raise ValueError(f"{src} has rope_theta {theta}, the target {rope.get('rope_theta')}")
    section = (cfg.get("rope_scaling") or {}).get("mrope_section")
    if kind in MROPE_KINDS and section is not None and list(section) != list(rope["mrope_section"]):
        raise ValueError(f"{src} has mrope_section {section}, the target {rope['mrope_section']}")


def head_config(ckpt: MSDCheckpoint, target_config: PretrainedConfig) -> PretrainedConfig:
    """The target's language-model config class and rope, with the checkpoint's layer shape."""
    cfg = ckpt.config
    fields = target_config.to_dict()
    fields.pop("layer_types", None)  # recomputed for the head's depth
    heads = cfg.get("num_attention_heads", target_config.num_attention_heads)
    fields.update(
        num_hidden_layers=cfg.get("num_hidden_layers", 1),
        intermediate_size=cfg.get("intermediate_size", target_config.intermediate_size),
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,  # EConfig's default
        rms_norm_eps=cfg.get("rms_norm_eps", target_config.rms_norm_eps),
        hidden_act=cfg.get("hidden_act", target_config.hidden_act))
    if layer_kind(target_config) == "llama":
        fields.update(head_dim=target_config.hidden_size // heads,
                      attention_bias=bool(cfg.get("qkv_bias", False)), mlp_bias=False)
    return type(target_config)(**fields)


def checkpoint_positions(ckpt: MSDCheckpoint) -> str:
    """The positions scheme the head was trained with (module docstring, "Positions")."""
    recorded = ckpt.config.get(POSITIONS_KEY)
    if recorded is not None:
        if recorded not in POSITION_SCHEMES:
            raise ValueError(f"{ckpt.source}: {POSITIONS_KEY} {recorded!r} is not one of "
                             f"{POSITION_SCHEMES}")
        return recorded
    if "transformers_version" in ckpt.config:  # a published (Hugging Face-written) config
        return PUBLISHED_POSITIONS[_checkpoint_kind(ckpt)]
    return "target"


def _check_embeddings(ckpt: MSDCheckpoint, target_embed: Tensor) -> None:  # target_embed: [V, H]
    stored = ckpt.state_dict[EMBED_KEY]
    rows = ckpt.config.get("vocab_size", target_embed.shape[0])
    if tuple(stored.shape) != (rows, target_embed.shape[1]):
        raise ValueError(f"{ckpt.source}: {EMBED_KEY} has shape {tuple(stored.shape)}, expected "
                         f"({rows}, {target_embed.shape[1]})")
    target_embed = target_embed[:rows]
    scale = float(target_embed.abs().max())
    worst = 0.0
    for i in range(0, rows, 4096):  # in row blocks: a 7B embedding is 0.5 GB in fp32
        block = stored[i:i + 4096].float() - target_embed[i:i + 4096].float().cpu()
        worst = max(worst, float(block.abs().max()))
    if worst > EMBED_TOLERANCE * scale:
        raise ValueError(f"{ckpt.source}: its {EMBED_KEY} differ from the target's (max |diff| "
                         f"{worst:.3g}, max |w| {scale:.3g}): the head was trained for another "
                         "target")


def _check_keys(ckpt: MSDCheckpoint, head: MSDHead, weights: dict[str, Tensor]) -> None:
    check_state_dict(ckpt, head.state_dict(), weights,
                     f"a {head.kind} head with {head.config.num_hidden_layers} layer(s)")


def check_state_dict(ckpt: MSDCheckpoint, expected: dict[str, Tensor],
                     weights: dict[str, Tensor], what: str) -> None:
    """The checkpoint's ``weights`` must have exactly the keys and shapes of ``expected`` (a
    head's state dict); ``what`` names that head in the error."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{ckpt.source}: state dict does not match {what}: missing {missing}, "
                         f"unexpected {unexpected}")
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{ckpt.source}: {key} has shape {tuple(value.shape)}, the head "
                             f"expects {tuple(expected[key].shape)}")


# ---------------------------------------------------------------------------- public API

def build_head(ckpt: MSDCheckpoint, target: PreTrainedModel, *, check_embeddings: bool = True,
               dtype: torch.dtype | None = None) -> MSDHead:
    """An ``MSDHead`` on ``target``'s embed_tokens and lm_head, with the checkpoint's weights."""
    text_config = target.config.get_text_config()
    check_against_target(ckpt, text_config)
    embed, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
    weights = {k: v for k, v in ckpt.state_dict.items()
               if k != EMBED_KEY and not k.endswith("rotary_emb.inv_freq")}
    if EMBED_KEY in ckpt.state_dict and check_embeddings:
        _check_embeddings(ckpt, embed.weight.detach())
    head = MSDHead(head_config(ckpt, text_config), embed, lm_head,
                   fc_bias=bool(ckpt.config.get("bias", True)),
                   vocab_limit=ckpt.config.get("vocab_size"), positions=checkpoint_positions(ckpt))
    _check_keys(ckpt, head, weights)
    head.load_state_dict(weights, strict=True)
    # on the device of the target's input embeddings (the drafter's device under a device_map)
    return head.to(device=embed.weight.device, dtype=dtype or lm_head.weight.dtype).eval()


def load_msd_head(source: str | Path, target: PreTrainedModel, *, check_embeddings: bool = True,
                  dtype: torch.dtype | None = None, revision: str | None = None) -> MSDHead:
    """Load a head from a local folder or a hub repo id and bind it to ``target`` (an HF
    LLaVA or Qwen2-VL model); ``dtype`` None: the target's. Raises a ValueError naming the
    mismatch when it does not fit."""
    return build_head(read_checkpoint(source, revision), target,
                      check_embeddings=check_embeddings, dtype=dtype)


def new_msd_head(target: PreTrainedModel, *, num_layers: int = 1, fc_bias: bool = True,
                 positions: str = "target") -> MSDHead:
    """A freshly initialised head (PyTorch's default init, as EAGLE's) shaped like one layer of
    ``target``'s language model and bound to its embed_tokens and lm_head: the start of training
    under the ``positions`` scheme."""
    text_config = target.config.get_text_config()
    kind = WRITTEN_MODEL_TYPE[layer_kind(text_config)]
    shape = {k: getattr(text_config, k) for k in ("hidden_size", "intermediate_size",
             "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "hidden_act")}
    ckpt = MSDCheckpoint({"model_type": kind, "num_hidden_layers": num_layers, **shape}, {},
                         "a new head")
    lm_head = target.get_output_embeddings()
    head = MSDHead(head_config(ckpt, text_config), target.get_input_embeddings(), lm_head,
                   fc_bias=fc_bias, positions=positions)
    return head.to(device=lm_head.weight.device, dtype=lm_head.weight.dtype)


def eagle_config(head: MSDHead) -> dict[str, Any]:
    """config.json for ``head`` in the layout MSD's and EAGLE's loaders read."""
    c = head.config
    rope = c.rope_parameters or {}
    out: dict[str, Any] = {
        "architectures": [WRITTEN_ARCHITECTURE[head.kind]],
        "model_type": WRITTEN_MODEL_TYPE[head.kind],
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "hidden_act": c.hidden_act,
        "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": head.vocab_limit or head.vocab_size,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id, "tie_word_embeddings": False,
        "rope_theta": rope.get("rope_theta"), "bias": head.fc.bias is not None,
        "torch_dtype": str(head.fc.weight.dtype).removeprefix("torch."),
        POSITIONS_KEY: head.positions,
    }
    if head.kind in MROPE_KINDS:
        out["rope_scaling"] = {"type": "mrope", "mrope_section": list(rope["mrope_section"])}
        if rope.get("mrope_interleaved"):
            out["rope_scaling"]["mrope_interleaved"] = True
    else:
        out["rope_scaling"] = None
    return out


def save_msd_head(head: MSDHead, folder: str | Path, *,
                  weights_file: str = WEIGHT_FILES[0]) -> Path:
    """Write ``config.json`` + ``weights_file`` (pytorch_model.bin or model.safetensors) with
    fc, layers and the target's embed_tokens rows, exactly as the published heads are laid out."""
    if weights_file not in WEIGHT_FILES:
        raise ValueError(f"weights_file must be one of {WEIGHT_FILES}, got {weights_file!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = eagle_config(head)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    embed = head.target.embed_tokens.weight.detach()[: config["vocab_size"]]
    state[EMBED_KEY] = embed.to(device="cpu", dtype=head.fc.weight.dtype).contiguous()
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if weights_file.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, str(folder / weights_file))
    else:
        torch.save(state, folder / weights_file)
    return folder

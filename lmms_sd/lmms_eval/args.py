"""``--model_args`` and ``gen_kwargs`` -> frozen settings dataclasses.

This is the only place in lmms_sd that reads ``key=value`` strings. Rules:
  - every key must name a field of the target dataclass, else a ``ValueError`` names the key and
    lists the valid ones; a required field left out is an error naming it;
  - values are converted with the field's annotated type (bool, int, float, str, ``X | None``,
    ``tuple[X, ...]`` written ``a;b;c`` because lmms-eval splits model_args on commas);
  - keys ``<group>.<name>`` belong to a component with its own settings dataclass: ``tree.``
    for the tree builder (``lmms_sd.trees.make_builder(tree, **params)``, e.g.
    ``tree=chain,tree.k=6``), ``cal.`` for the calibrated OPT-Tree (``CalibratedSettings``).

lmms-eval itself would turn ``pretrained=0001`` into the integer 1 and ``off`` into a string;
our model classes split the raw string themselves (``split_model_args``) so the dataclass field
types alone decide.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ..core.generate import GenerationConfig
from ..core.sampling import SamplingConfig

T = TypeVar("T")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


# ---------------------------------------------------------------------------- model_args

@dataclass(frozen=True)
class CommonArgs:
    """Settings of every speculative model class (``llava_sd``, ``qwen2_vl_msd``, ...).

    pretrained:      the target checkpoint: a folder saved with ``save_pretrained`` or a hub id
                     ``ORG/NAME`` (every model argument also takes ``ORG/NAME@REV``).
    revision:        the hub revision (branch, tag or commit) of ``pretrained``.
    sd:              ``off`` decodes autoregressively through the very same wrapper.
    baseline:        also decode every request autoregressively and report the speedup and the
                     number of greedy text mismatches (a losslessness check).
    max_new_tokens:  used when a task's ``gen_kwargs`` set none.
    seed:            sampling seed; request ``doc_id`` is added so each request is reproducible.
    dtype:           ``auto`` (float32 on the CPU, the checkpoint's ``torch_dtype`` on a GPU),
                     ``float32``, ``bfloat16`` or ``float16``: the target's.
    draft_dtype:     ``auto`` (the target's dtype) or one of the above: drafts and heads.
    attn_implementation: passed to ``from_pretrained`` (``sdpa``, ``eager``,
                     ``flash_attention_2``: tree-masked steps then run through SDPA).
    device:          ``cpu``, ``cuda``, ``cuda:1``; default: the process's GPU, else the CPU.
    device_map:      ``auto`` (or ``balanced``, ``sequential``): accelerate spreads the target
                     over this process's GPUs (all of them in one process, an equal share of
                     the node's GPUs per process under ``--num_processes N``); drafters sit on
                     the device of the target's input embeddings.
    stats_path:      per-sample JSONL of speed statistics; default: beside lmms-eval's results.
    batch_size:      must be 1 (speculative decoding here is per request).
    max_batch_size:  accepted from the lmms-eval CLI and unused.
    image_aspect_ratio: ``pad`` (LLaVA-1.5's pad-to-square) or ``original``; wins over a task's
                     gen_kwargs; default: the task's, else ``original``. A no-op for Qwen2-VL.
    """

    pretrained: str
    sd: bool = True
    baseline: bool = False
    max_new_tokens: int = 256
    seed: int = 0
    revision: str | None = None
    dtype: str = "auto"
    draft_dtype: str = "auto"
    attn_implementation: str | None = None
    device: str | None = None
    device_map: str | None = None
    stats_path: str | None = None
    batch_size: int = 1
    max_batch_size: int | None = None
    image_aspect_ratio: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size != 1:
            raise ValueError(f"batch_size must be 1 (requests are decoded one at a time), "
                             f"got {self.batch_size}")
        if self.baseline and not self.sd:
            raise ValueError("baseline=true compares speculative decoding with autoregressive "
                             "decoding; with sd=off there is nothing to compare")
        for key in ("dtype", "draft_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ValueError(f"{key} must be one of {DTYPES}, got {getattr(self, key)!r}")
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise ValueError(f"device_map must be one of {DEVICE_MAPS}, got {self.device_map!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.image_aspect_ratio is not None:
            image_aspect_ratio({}, self.image_aspect_ratio)


@dataclass(frozen=True)
class SDArgs(CommonArgs):
    """``*_sd``: a separate draft model.

    draft:           the draft checkpoint: a small VLM of the target's family, or a text-only LM
                     with the target's tokenizer.
    draft_text_only: hide the image from a VLM draft (a text-only LM draft never sees it).
    tree:            tree builder name (``lmms_sd.trees``); its settings go in ``tree.<key>=``.
                     Default ``auto``: planned at start-up from measured costs (``trees/auto.py``).
    """

    draft: str | None = None
    draft_text_only: bool = False
    tree: str = "auto"


@dataclass(frozen=True)
class _HeadArgs(CommonArgs):
    """The draft-head keys shared by ``*_msd`` and ``*_msd_calibrated``.

    draft:            the head: a folder (or hub id) in the published EAGLE/MSD layout.
    msd_model_path:   the same, under the name the MSD code uses (give one of the two).
    positions:        ``target`` (the target's exact positions, M-RoPE included) or
                      ``sequential`` (1-D positions, as MSD's Qwen2-VL head was trained);
                      default: the scheme the head was trained with (its config's record, else
                      its publisher's: ``sequential`` for a published MSD Qwen2-VL head).
    check_embeddings: compare the head's stored embedding with the target's.
    """

    draft: str | None = None
    msd_model_path: str | None = None
    positions: str | None = None
    check_embeddings: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.draft and self.msd_model_path and self.draft != self.msd_model_path:
            raise ValueError(f"draft={self.draft!r} and msd_model_path={self.msd_model_path!r} "
                             "name two different heads; give one")
        if not self.draft:
            object.__setattr__(self, "draft", self.msd_model_path)


@dataclass(frozen=True)
class MSDArgs(_HeadArgs):
    """``*_msd``: an MSD / EAGLE-2 draft head on the target's features (keys of ``_HeadArgs``).

    tree:             tree builder name, default ``auto`` (planned at start-up from measured
                      costs); ``dynamic`` is EAGLE-2's tree with MSD's defaults.
    """

    tree: str = "auto"


@dataclass(frozen=True)
class Eagle3Args(CommonArgs):
    """``*_eagle3``: an EAGLE-3 draft head on the target's low / middle / high layer states.

    draft:            the head: a folder (or hub id) in the published EAGLE-3 layout.
    positions:        ``target`` | ``sequential`` (as for MSD heads); default: the head's record.
    decouple_images:  MSD's modality decoupling: image slots read the target's visual embedding
                      (EAGLE-3 does not; default false).
    check_embeddings: compare a stored embedding (if the file has one) with the target's.
    tree:             tree builder name, default ``dynamic`` with EAGLE-3's published defaults
                      (depth 7, top_k 10, total_tokens 60) for every ``tree.<key>`` not given.
    """

    draft: str | None = None
    positions: str | None = None
    decouple_images: bool = False
    check_embeddings: bool = True
    tree: str = "dynamic"


@dataclass(frozen=True)
class MSDCalibratedArgs(_HeadArgs):
    """``*_msd_calibrated``: the MSD head under the Calibrated OPT-Tree. The tree is fixed; its
    and the calibrator's settings go in ``cal.<key>=`` (``CalibratedSettings``: steering
    (thesis | replace), nodes, top_k, max_depth, threshold, alpha, train_ratio, calibrator,
    label, ...). Head keys as ``_HeadArgs``."""


@dataclass(frozen=True)
class CascadeArgs(CommonArgs):
    """``*_cascade``: CS Drafting's cascade of drafts.

    drafts:    draft checkpoints from large to small, ``;``-separated; ``mag`` is the statistical
               bottom draft (longest suffix match, then a bigram table).
    k_matrix:  the n x n quotas, rows ``;``-separated, entries space-separated (``"4 2;0 3"``);
               default: CS Drafting's published matrix for n drafts (``PUBLISHED_DEFAULTS``:
               ``10`` for MaG alone, ``13 10;0 10`` for one draft + MaG, ...).
    lenience:  L >= 1 for the reviews inside the cascade (the target's review stays exact);
               default: the published value for n drafts (1, 3, 2 for n = 1, 2, 3).
    bottom_tokens: tokens the bottom draft proposes per call; default: the missing quota;
               ``10`` as the published cascade.
    mag_match: ``recent`` (default) or ``earliest`` (the published MaG) occurrence of the
               longest suffix match.
    bigram:    a bigram table file for ``mag`` (``lmms_sd.drafters.bigram``), checked against
               the target's tokenizer.
    tree:      default ``cascade`` (the cascade's own chain); any builder name also works.
    """

    drafts: tuple[str, ...] = ()
    k_matrix: str = ""
    lenience: float | None = None
    bottom_tokens: int | None = None
    mag_match: str = "recent"
    bigram: str | None = None
    tree: str = "cascade"


def split_model_args(arg_string: str) -> dict[str, str]:
    """``"a=1,b=x"`` -> ``{"a": "1", "b": "x"}`` with values left as strings."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in arg_string.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"model_args item {item!r} is not of the form key=value")
        key = key.strip()
        if key in out:
            raise ValueError(f"model_args key {key!r} is given twice")
        out[key] = value.strip()
    return out


def parse_model_args(cls: type[T], values: Mapping[str, object], groups: tuple[str, ...] = ()
                     ) -> tuple[T, dict[str, dict[str, object]]]:
    """Build ``cls`` from ``values``, setting aside the ``<group>.<key>`` entries of ``groups``.

    Returns the settings and, per group, its parameters (values still as given). A dotted key
    of any other group is an unknown key."""
    grouped: dict[str, dict[str, object]] = {g: {} for g in groups}
    own: dict[str, object] = {}
    for key, value in values.items():
        group, dot, name = key.partition(".")
        if dot and group in grouped:
            grouped[group][name] = value
        else:
            own[key] = value
    return from_mapping(cls, own, what="model_args"), grouped


def from_mapping(cls: type[T], values: Mapping[str, object], what: str = "settings") -> T:
    """Build the dataclass ``cls`` from ``values``, converting each by its field type."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {what} key {unknown[0]!r} for {cls.__name__}; "
                         f"valid keys: {', '.join(sorted(fields))}")
    missing = [n for n, f in fields.items() if n not in values and _required(f)]
    if missing:
        raise ValueError(f"{what} of {cls.__name__} needs {missing[0]!r}")
    return cls(**{k: coerce(v, hints[k], key=k) for k, v in values.items()})


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def coerce(value: object, hint: Any, key: str = "value") -> Any:
    """Convert ``value`` (a string from the command line, or already typed) to ``hint``."""
    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [p for p in params if p is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            if len(inner) < len(params):
                return None
        if len(inner) != 1:
            raise TypeError(f"{key}: unions other than `X | None` are not supported ({hint})")
        return coerce(value, inner[0], key)
    if origin is tuple:
        items = value.split(";") if isinstance(value, str) else list(value)  # type: ignore
        elem = params[0] if params else str
        return tuple(coerce(v.strip() if isinstance(v, str) else v, elem, key)
                     for v in items if not (isinstance(v, str) and not v.strip()))
    if hint is bool:
        return _to_bool(value, key)
    if hint is int:
        return _to_int(value, key)
    if hint is float:
        return _to_float(value, key)
    if hint is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key}={value!r} is not a string")
    if hint is Any or hint is object:
        return value
    raise TypeError(f"{key}: no conversion to {hint}")


def _to_bool(value: object, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{key}={value!r} is not a boolean (true/false, on/off, yes/no, 1/0)")


def _to_int(value: object, key: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{key}={value!r} is not an integer") from None


# ---------------------------------------------------------------------------- gen_kwargs

# Settings that would change the output distribution and that the core does not implement, with
# their neutral value. Tasks that set them to something else get an error, not a silent change.
_UNSUPPORTED = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0,
                "min_length": 0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "length_penalty": 1.0, "typical_p": 1.0, "min_p": None, "epsilon_cutoff": 0.0,
                "eta_cutoff": 0.0}
# Keys that do not change what is decoded: lmms-eval's own llava / qwen2_vl classes ignore
# them too (image_aspect_ratio is read by ``image_aspect_ratio`` below).
_IGNORED = ("image_aspect_ratio", "visual_cot", "max_agentic_steps", "skip_special_tokens",
            "stop_sequences", "seed", "use_cache", "image_sizes", "modalities")
_HONOURED = ("max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "until", "num_beams")
ASPECT_RATIOS = ("original", "pad")


def generation_config(gen_kwargs: Mapping[str, object], *, default_max_new_tokens: int,
                      eos_token_ids: tuple[int, ...], seed: int | None,
                      max_length: int | None = None) -> GenerationConfig:
    """Map a request's lmms-eval ``gen_kwargs`` onto the core's ``GenerationConfig``, reading
    them as ``transformers``' ``generate`` does (table in the README, "lmms-eval tasks: what
    decodes"): greedy unless sampling is asked for, and then temperature, top_p and top_k are
    neither used nor validated; ``do_sample`` true with temperature 0 is an error, as it is in
    transformers. Without ``do_sample``, temperature > 0 samples (lmms-eval's own rule).
    Keys in ``_IGNORED`` are accepted; unknown keys and ``_UNSUPPORTED`` settings at a
    non-neutral value are errors naming the key. ``max_length``: the target's max positions
    (the core clips max_new_tokens to the room they leave after the prompt)."""
    g = {k: v for k, v in gen_kwargs.items() if v is not None}
    _check_keys(g)
    max_new = g.get("max_new_tokens")
    return GenerationConfig(
        max_new_tokens=default_max_new_tokens if max_new is None
        else _to_int(max_new, "max_new_tokens"),
        eos_token_ids=tuple(eos_token_ids),
        stop_strings=stop_strings(g.get("until")),
        sampling=_sampling(g),
        seed=seed,
        max_length=max_length,
    )


def _check_keys(g: Mapping[str, object]) -> None:
    """Unknown keys, beam search and unimplemented distribution changes are errors."""
    for key in g:
        if key not in _HONOURED + _IGNORED and key not in _UNSUPPORTED:
            raise ValueError(f"unknown gen_kwargs key {key!r}; known keys: "
                             f"{', '.join(sorted(_HONOURED + _IGNORED + tuple(_UNSUPPORTED)))}")
    beams = _to_int(g.get("num_beams", 1), "num_beams")
    if beams != 1:
        raise ValueError(f"num_beams={beams}: beam search is not speculative decoding; "
                         f"only num_beams=1 is supported")
    for name, neutral in _UNSUPPORTED.items():
        if name in g and (neutral is None or float(g[name]) != neutral):  # type: ignore[arg-type]
            raise ValueError(f"gen_kwargs {name}={g[name]!r} is not supported (it changes the "
                             f"target distribution); leave it at {neutral}")


def _sampling(g: Mapping[str, object]) -> SamplingConfig:
    """Greedy unless sampling is asked for; the filters are read only when sampling."""
    do_sample = None if "do_sample" not in g else _to_bool(g["do_sample"], "do_sample")
    temperature = None if "temperature" not in g else _to_float(g["temperature"], "temperature")
    if do_sample is None:
        do_sample = bool(temperature)
    if not do_sample:
        return SamplingConfig()
    if temperature == 0:
        raise ValueError("gen_kwargs do_sample=True with temperature=0: transformers refuses this "
                         "too (temperature must be > 0 to sample); set do_sample=False for greedy")
    return SamplingConfig(
        temperature=1.0 if temperature is None else temperature,
        top_p=_to_float(g.get("top_p", 1.0), "top_p"),
        top_k=_to_int(g.get("top_k", 0), "top_k"),
    )


def image_aspect_ratio(gen_kwargs: Mapping[str, object], model_arg: str | None) -> str:
    """How images are fitted to the vision tower: the model arg if given, else the request's
    ``gen_kwargs`` (as lmms-eval's llava class, where the model's own config wins), else
    ``original`` (the processor's own resize / crop)."""
    value = model_arg if model_arg is not None else gen_kwargs.get("image_aspect_ratio")
    value = "original" if value is None else str(value)
    if value not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio={value!r} is not supported; choose from "
                         f"{ASPECT_RATIOS} (anyres is LLaVA-NeXT's, not LLaVA-1.5's)")
    return value


def _to_float(value: object, key: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is not a number")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} is not a number") from None


def stop_strings(until: object) -> tuple[str, ...]:
    """lmms-eval's ``until``: a string, a list of strings, or None."""
    if until is None:
        return ()
    if isinstance(until, str):
        return (until,) if until else ()
    if isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until):
        return tuple(s for s in until if s)
    raise ValueError(f"gen_kwargs until={until!r} must be a string or a list of strings")


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """The text before the first stop string (lmms-eval models return text without it)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]

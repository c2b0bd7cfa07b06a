"""Speculative decoding on one's own images and prompts: ``lmms_sd.load(...).generate(...)``.

    sd = lmms_sd.load(target, method="msd", draft=head, **{"tree": "chain", "tree.k": 4})
    out = sd.generate(image, "Describe the image.", max_new_tokens=64, baseline=True)
    out.text, out.tokens, out.origin, out.tau, out.acceptance_rate, out.speedup, out.greedy_match

``load`` takes the lmms-eval classes' ``model_args`` keys as keyword arguments (dotted keys such
as ``tree.k`` through ``**{...}``) and checks them with the same parser and errors; the target's
family (LLaVA or Qwen2-VL) comes from its ``config.json``. A ``Speculator`` is also what every
lmms-eval class decodes with (``lmms_sd.lmms_eval.base``), so both give the same output for the
same request. ``lmms_sd.csd`` is CS Drafting's entry point (``drafters.cascade.csd``).
"""
from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .adapters import HFAdapter, load_adapter
from .adapters.base import Messages
from .adapters.loading import model_type
from .core.generate import GenerationConfig, GenerationStats, StepObserver, generate
from .core.generate import GenerationResult as CoreResult
from .core.interfaces import PromptInputs
from .core.tree import DraftTree
from .core.verify import Verdict
from .lmms_eval.args import cut_at_stop, generation_config, image_aspect_ratio
from .lmms_eval.autotree import StartUp, plan_at_startup
from .lmms_eval.mismatch import GapRecorder, Mismatch, classify
from .methods import FAMILIES, Method, MSDCalibrated, method_class, split_model_name

ImageLike = Image.Image | str | Path  # a PIL image, a file path or a data: URL


@dataclass(frozen=True)
class Generation:
    """One answer. ``text`` stops before a stop string; ``tokens`` are every emitted id (EOS
    and a stop string's tokens included); ``baseline`` is the autoregressive decode of the same
    prompt when one was asked for; ``extras`` hold method facts (e.g. cascade review counts)."""

    text: str
    result: CoreResult
    greedy: bool
    baseline: CoreResult | None = None
    baseline_text: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    mismatch: Mismatch | None = None  # a greedy mismatch's diagnosis (tie or real)

    @property
    def tokens(self) -> list[int]:
        return self.result.tokens

    @property
    def stats(self) -> GenerationStats:
        return self.result.stats

    @property
    def origin(self) -> list[str]:
        """Per token: ``"draft"`` (an accepted draft token) or ``"target"``."""
        return self.stats.origin

    @property
    def tau(self) -> float:
        return self.stats.tau

    @property
    def acceptance_rate(self) -> float:
        return self.stats.acceptance_rate

    @property
    def tokens_per_second(self) -> float:
        return self.stats.tokens_per_second

    @property
    def speedup(self) -> float | None:
        """tokens/s over the baseline's tokens/s (``baseline=True`` only)."""
        if self.baseline is None or self.baseline.stats.tokens_per_second == 0:
            return None
        return self.tokens_per_second / self.baseline.stats.tokens_per_second

    @property
    def greedy_match(self) -> bool | None:
        """Greedy decoding with a baseline: is the text the autoregressive text?"""
        return self.text == self.baseline_text if self.greedy and self.baseline else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the headline figures, then ``stats`` (``origin``: d = draft, t = target)."""
        return {"text": self.text, "tokens": list(self.tokens), "tau": self.tau,
                "acceptance_rate": self.acceptance_rate,
                "tokens_per_second": self.tokens_per_second, "speedup": self.speedup,
                "greedy": self.greedy, "greedy_match": self.greedy_match,
                "stats": self.stats.to_dict(),
                "baseline": None if self.baseline is None else self.baseline.stats.to_dict(),
                "mismatch": None if self.mismatch is None else self.mismatch.to_dict(),
                **self.extras}


class Speculator:
    """A target with a method's drafter and tree builder (none with ``sd=off``), on ``device``.

    ``family``: the family the target must be (the lmms-eval classes), or None (any)."""

    def __init__(self, method: Method, device: torch.device, family: str | None = None, *,
                 max_memory: dict[int | str, int] | None = None):
        self.method, self.settings, self.name = method, method.settings, method.name
        self.family = check_family(self.settings.pretrained, family, self.name,
                                   self.settings.revision)
        s = self.settings
        self.target = load_adapter(s.pretrained, revision=s.revision, device=device,
                                   dtype=s.dtype, attn_implementation=s.attn_implementation,
                                   device_map=s.device_map, max_memory=max_memory,
                                   role="target", family=self.family)
        self.device = self.target.device  # its input embeddings' device under a device_map
        self.drafter, self.builder = (method.make_decoder(self.target, self.load)
                                      if self.settings.sd else (None, None))
        self.startup: StartUp | None = None  # tree=auto: what the start-up measured and chose

    def load(self, path: str) -> HFAdapter:
        """A draft checkpoint (folder or hub id) as an adapter on the device of the target's
        input embeddings, in the target's dtype unless ``draft_dtype`` says otherwise; its kind
        is checked before anything is allocated."""
        return load_adapter(path, device=self.device, dtype=self.draft_dtype,
                            attn_implementation=self.settings.attn_implementation,
                            role="draft", family=self.family)

    @property
    def draft_dtype(self) -> torch.dtype:
        """The dtype of drafts and heads: ``draft_dtype``, or the target's under ``auto``."""
        name = self.settings.draft_dtype
        return self.target.dtype if name == "auto" else getattr(torch, name)

    def generate(self, images: ImageLike | Sequence[ImageLike] | None,
                 prompt: str | Messages, *, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, do_sample: bool | None = None,
                 stop: str | Sequence[str] | None = None, num_beams: int = 1,
                 seed: int | None = None, baseline: bool | None = None) -> Generation:
        """Answer ``prompt`` about ``images``.

        prompt: a user message (the images go before it), or chat messages whose image parts
          place the images (``messages_and_images``). The sampling arguments mean what they mean
          in lmms-eval's ``gen_kwargs`` (temperature 0 or do_sample False: greedy; num_beams
          only 1). Defaults: ``max_new_tokens`` and ``seed`` from the settings, greedy; baseline
          from ``baseline=`` of the settings."""
        prompt, pictures = messages_and_images(prompt, images)
        prepared = self.target.prepare(prompt, pictures,
                                       image_aspect_ratio=image_aspect_ratio(
                                           {}, self.settings.image_aspect_ratio))
        gen_kwargs = {"max_new_tokens": max_new_tokens, "temperature": temperature,
                      "top_p": top_p, "top_k": top_k, "do_sample": do_sample, "until": stop,
                      "num_beams": num_beams}
        cfg = self.config({k: v for k, v in gen_kwargs.items() if v is not None},
                          self.settings.seed if seed is None else seed)
        return self.run(prepared, cfg, "generate",
                        self.settings.baseline if baseline is None else baseline)

    def config(self, gen_kwargs: Mapping[str, object], seed: int | None) -> GenerationConfig:
        """lmms-eval ``gen_kwargs`` -> the core's settings (``args.generation_config``)."""
        return generation_config(gen_kwargs, default_max_new_tokens=self.settings.max_new_tokens,
                                 eos_token_ids=self.target.eos_token_ids, seed=seed,
                                 max_length=self.target.max_positions)

    def warm_up(self, prompt: PromptInputs, cfg: GenerationConfig, baseline: bool) -> None:
        """Decode ``prompt`` once, untimed (both ways with ``baseline``). With ``tree=auto``
        (or MSD's / Sequoia's start-up choices) this decode measures the costs and the
        acceptance and plans the tree (``lmms_eval.autotree.plan_at_startup``)."""
        if self.drafter is not None and self.builder is None:
            self.startup, self.builder = plan_at_startup(self.target, self.drafter, prompt, cfg,
                                                         self.method.auto, self.target.decode)
        elif self.drafter is not None:
            self._decode(prompt, cfg, True)
        if self.drafter is None or baseline:
            self._decode(prompt, cfg, False)

    def run(self, prompt: PromptInputs, cfg: GenerationConfig, task: str,
            baseline: bool, baseline_first: bool = False) -> Generation:
        """Decode one request of ``task`` speculatively (autoregressively with ``sd=off``),
        and with ``baseline`` autoregressively too, unless the method left it unmeasured;
        ``baseline_first`` runs the autoregressive decode first (callers alternate it, so
        neither side always runs warm). A tree still to be planned is planned first."""
        if baseline and self.drafter is None:
            raise ValueError("baseline compares speculative decoding with autoregressive "
                             "decoding; with sd=off there is nothing to compare")
        speculative = self.drafter is not None
        if speculative and self.builder is None:
            self.warm_up(prompt, cfg, False)
        # top-2 logit gaps of both runs, to tell a numerical tie from a real mismatch
        gaps = (GapRecorder(), GapRecorder()) if baseline else None
        early = self._decode(prompt, cfg, False, gaps[1]) if gaps and baseline_first else None
        observer = self.method.start_request(task, cfg) if speculative else None
        if gaps is not None:
            observer = gaps[0] if observer is None else _both(observer, gaps[0])
        text, result = self._decode(prompt, cfg, speculative, observer)
        extras = self.method.request_extras() if speculative else {}
        if self.startup is not None:
            extras = {"tree": self.startup.to_dict(), **extras}
        if not (baseline and extras.get("measured", True)):
            return Generation(text, result, cfg.sampling.greedy, extras=extras)
        base_text, base = early or self._decode(prompt, cfg, False, gaps[1])
        mismatch = None
        if cfg.sampling.greedy and text != base_text:
            mismatch = classify(result.tokens, base.tokens, *gaps, self.target.dtype)
        return Generation(text, result, cfg.sampling.greedy, base, base_text, extras, mismatch)

    def _decode(self, prompt: PromptInputs, cfg: GenerationConfig, speculative: bool,
                observer: StepObserver | None = None) -> tuple[str, CoreResult]:
        drafter, builder = (self.drafter, self.builder) if speculative else (None, None)
        result = generate(self.target, prompt, cfg, drafter, builder, self.target.decode,
                          observer=observer)
        return cut_at_stop(self.target.decode(result.tokens), cfg.stop_strings), result


def _both(first: StepObserver, second: StepObserver) -> StepObserver:
    """One observer that calls ``first``, then ``second``."""

    def observe(tree: DraftTree, target_logits: torch.Tensor, verdict: Verdict) -> None:
        first(tree, target_logits, verdict)
        second(tree, target_logits, verdict)

    return observe


def load(target: str | Path, method: str = "msd", *, draft: str | Path | None = None,
         tree: str | None = None, dtype: str | None = None, device: str | None = None,
         **settings: Any) -> Speculator:
    """A speculative decoder for the LLaVA or Qwen2-VL checkpoint ``target``.

    method:   ``sd`` (a draft model), ``msd`` (an MSD / EAGLE-2 head), ``msd_calibrated``
              (needs ``**{"cal.calibrator": PATH}``), ``cascade`` (``drafts=[...]``,
              ``k_matrix="4 2;0 3"``) or ``eagle3`` (an EAGLE-3 head): the methods of
              ``lmms_sd.methods``.
    draft:    the draft model or head; tree: a builder name (default: the method's), its
              settings as ``**{"tree.k": 4}``; dtype: float32 (default), bfloat16 or float16;
              device: default cuda when available, else cpu.
    settings: any other ``model_args`` key of the method (``args.SDArgs``, ``MSDArgs``, ...),
              e.g. ``max_new_tokens``, ``seed``, ``baseline``, ``sd``. None means the default.
    """
    method_class(method)
    values = {"pretrained": target, "draft": draft, "tree": tree, "dtype": dtype,
              "device": device, **settings}
    name = f"{check_family(target, None, 'lmms_sd.load')}_{method}"
    return open_model(name, {k: v for k, v in values.items() if v is not None})


def open_model(name: str, model_args: Mapping[str, object]) -> Speculator:
    """The decoder of the lmms-eval model ``name`` (e.g. ``llava_msd``) with ``model_args``."""
    family, method = split_model_name(name)
    spec = method_class(method).parse(model_args, name)
    if isinstance(spec, MSDCalibrated) and spec.calibration.calibrator is None:
        raise ValueError(f"{name} outside lmms-eval needs cal.calibrator=PATH (a fitted "
                         "calibrator): online calibration (cal.train_ratio) needs each task's "
                         "request count up front, which only an evaluation knows")
    default = "cuda" if torch.cuda.is_available() else "cpu"
    return Speculator(spec, torch.device(spec.settings.device or default), family)


def check_family(path: str | Path, family: str | None, who: str,
                 revision: str | None = None) -> str:
    """The family of the target at ``path`` (its ``model_type``), which must be ``family``
    when given, else one of ``FAMILIES``."""
    found = model_type(path, revision)
    if family is not None and found != family:
        raise ValueError(f"{who} needs a {family} target; {path} is a {found} checkpoint")
    if found not in FAMILIES:
        raise ValueError(f"{who}: {path} is a {found!r} checkpoint; the target must be one of "
                         f"{', '.join(FAMILIES)}")
    return found


# ---------------------------------------------------------------------------- inputs

def messages_and_images(prompt: str | Messages, images: ImageLike | Sequence[ImageLike] | None
                        ) -> tuple[str | Messages, list[Image.Image]]:
    """The prompt for ``HFAdapter.prepare`` and its images in order.

    A string prompt takes ``images`` as given. Messages (``{"role", "content"}``, content a
    string or a list of parts) place their images with parts ``{"type": "image"}`` (the next
    of ``images``), ``{"type": "image", "url" | "image": IMAGE}`` (lmms-eval, transformers) or
    ``{"type": "image_url", "image_url": {"url": IMAGE}}`` (OpenAI); IMAGE is a PIL image, a
    path or a data: URL. Every image given must have its place."""
    given = [] if images is None else [images] if isinstance(images, (Image.Image, str, Path)) \
        else list(images)
    if isinstance(prompt, str):
        return prompt, [open_image(i) for i in given]
    out, pictures, free = [], [], iter(given)
    for m in prompt:
        parts = m["content"]
        parts = [{"type": "text", "text": parts}] if isinstance(parts, str) else parts
        content = []
        for part in parts:
            kind = part.get("type")
            if kind == "text":
                content.append({"type": "text", "text": part["text"]})
                continue
            if kind not in ("image", "image_url"):
                raise NotImplementedError(f"message part of type {kind!r}: only text and image "
                                          "inputs are supported")
            source = part["image_url"]["url"] if kind == "image_url" else \
                part.get("url", part.get("image"))
            source = next(free, None) if source is None else source
            if source is None:
                raise ValueError(f"the messages have more image parts than the {len(given)} "
                                 "image(s) given")
            pictures.append(open_image(source))
            content.append({"type": "image"})
        out.append({"role": m["role"], "content": content})
    if next(free, None) is not None:
        raise ValueError(f"{len(given)} image(s) given but the messages have fewer "
                         "{'type': 'image'} parts to place them")
    return out, pictures


def open_image(source: ImageLike) -> Image.Image:
    """An RGB image from a PIL image, a file path or a ``data:image/...;base64,`` URL."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    text = str(source)
    if text.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(text.partition(",")[2]))).convert("RGB")
    if text.startswith(("http://", "https://")):
        raise ValueError(f"{text}: download the image and pass the file or a PIL image")
    return Image.open(text.removeprefix("file://")).convert("RGB")

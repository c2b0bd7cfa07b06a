"""The lmms-eval model class shared by every speculative method.

One request, in order:
  1. inputs    simple requests: ``(ctx, gen_kwargs, doc_to_visual, doc_id, task, split)``;
               chat requests: ``(ctx, doc_to_messages, gen_kwargs, doc_id, task, split)``
  2. prompt    the target adapter's ``prepare`` applies the chat template and the processor
               (``image_aspect_ratio`` from the model args, else from ``gen_kwargs``)
  3. settings  ``gen_kwargs`` -> ``GenerationConfig`` read as transformers reads them
               (``args.generation_config``); max_new_tokens is clipped to the room the target's
               max positions leave (one warning per task), an overlong prompt is an error
  4. decode    the core loop with the method's drafter and tree builder (none with ``sd=off``)
  5. baseline  with ``baseline=true`` the same prompt again, autoregressively; the order of the
               two alternates from request to request, so neither side always runs warm; a
               greedy mismatch is classified as a numerical tie or a real one (``mismatch.py``)
               (4. and 5. are ``lmms_sd.api.Speculator.run``, the decoder of ``lmms_sd.load``)
  6. record    per-request statistics; after the last request every rank gathers them and
               rank 0 reports them to lmms-eval and writes the per-sample JSONL (``speed.py``)
Requests the evaluator adds only to even out ranks (``__padding_only__``) are not decoded.
Before the first request is timed, it is decoded once untimed (both ways with ``baseline=true``):
a warm-up. With ``tree=auto`` (or MSD's ``tree=dynamic,tree.total_tokens=-1``, Sequoia's
``tree=static,tree.budget=-1``) that warm-up is the start-up measurement that picks the tree
(``autotree.py``); the choice goes into every record and the throughput section.
Errors propagate: a request that fails to decode fails the run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from loguru import logger as eval_logger
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from ..api import Speculator, messages_and_images
from ..core.generate import GenerationConfig
from ..core.interfaces import PromptInputs
from ..methods import method_class
from .args import image_aspect_ratio, split_model_args
from .autotree import StartUp
from .mismatch import Mismatch
from .speed import Record, gather, log_speed, results_dir_jsonl, sample_stats, write_jsonl


@dataclass(frozen=True)
class RequestInputs:
    """One lmms-eval request, unpacked. ``prompt``: the user text (its images go first) of a
    simple request, or the chat messages of a chat request (images as ``{"type": "image"}``)."""

    prompt: str | list[dict[str, Any]]
    images: list[Image.Image]
    gen_kwargs: dict[str, Any]
    task: str
    doc_id: int


class SpeculativeLMM(lmms):
    """Base of the ``<family>_<method>`` model classes: a family sets ``family`` (what the
    target checkpoint must be), a method ``method`` (a key of ``lmms_sd.methods.METHODS``, which
    holds its settings and drafter), a chat variant ``is_simple = False``. The decoder is the
    ``lmms_sd.api.Speculator`` that ``lmms_sd.load`` returns."""

    is_simple: ClassVar[bool] = True
    family: ClassVar[str] = ""
    method: ClassVar[str] = ""
    _warm: bool = False
    _served: int = 0

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict[str, Any] | None = None) -> "SpeculativeLMM":
        """Like lmms-eval's, but values stay strings so our field types alone convert them."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **split_model_args(arg_string)})

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        spec = method_class(self.method).parse(model_args, f"{self.family}_{self.method}")
        self.settings = spec.settings
        self.accelerator = Accelerator()
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        self._device = _pick_device(self.settings.device, self.accelerator)
        memory = process_max_memory(self.accelerator) if self.settings.device_map else None
        self.decoder = Speculator(spec, self._device, self.family, max_memory=memory)
        self.target, self.drafter = self.decoder.target, self.decoder.drafter
        self._device = self.decoder.device  # the target's input embeddings' (device_map)
        self._clipped_tasks: set[str] = set()

    @property
    def startup(self) -> StartUp | None:
        """What ``tree=auto`` measured and chose at start-up (None before or without it)."""
        return self.decoder.startup

    # ------------------------------------------------------------------ lmms-eval API
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return 1

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        out: list[GenerationResult] = []
        records: list[Record] = []
        if self.drafter is not None:
            self.decoder.method.plan([req.task_name for req in requests if not _padding(req)])
        first = next((req for req in requests if not _padding(req)), None)
        if first is not None and not self._warm:
            self._warm_up(first)
        for req in tqdm(requests, disable=self.rank != 0, desc=f"{type(self).__name__}"):
            if _padding(req):
                out.append(GenerationResult(text="", token_counts=None))  # discarded by lmms-eval
                continue
            text, record, counts = self._respond(req)
            out.append(GenerationResult(text=text, token_counts=counts))
            records.append(record)
        self._report(records)
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(f"{type(self).__name__} decodes (generate_until); "
                                  "loglikelihood tasks have nothing to speculate")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} does not support multi-round tasks")

    # ------------------------------------------------------------------ one request
    def _warm_up(self, req: Instance) -> None:
        """Decode ``req`` once, untimed and unrecorded; with ``tree=auto`` this plans the tree."""
        _inputs, prompt, cfg = self._prepare(req)
        self.decoder.warm_up(prompt, cfg, self.settings.baseline)
        if self.decoder.startup is not None:
            eval_logger.info(f"tree=auto chose {self.decoder.startup.plan.spec}: "
                             f"{self.decoder.startup.to_dict()}")
        self._warm = True

    def _prepare(self, req: Instance) -> tuple[RequestInputs, PromptInputs, GenerationConfig]:
        inputs = self._request_inputs(req)                                          # 1.
        aspect = image_aspect_ratio(inputs.gen_kwargs, self.settings.image_aspect_ratio)
        prompt = self.target.prepare(inputs.prompt, inputs.images,
                                     image_aspect_ratio=aspect)                       # 2.
        cfg = self.decoder.config(inputs.gen_kwargs,
                                  seed=self.settings.seed + inputs.doc_id)            # 3.
        self._check_length(inputs.task, inputs.doc_id, cfg, len(prompt.input_ids))
        return inputs, prompt, cfg

    def _respond(self, req: Instance) -> tuple[str, Record, TokenCounts]:
        inputs, prompt, cfg = self._prepare(req)                                     # 1.-3.
        task, doc_id, gen_kwargs = inputs.task, inputs.doc_id, inputs.gen_kwargs
        ar_first = self.settings.baseline and self._served % 2 == 1                 # 5. order
        self._served += 1
        out = self.decoder.run(prompt, cfg, task, self.settings.baseline, ar_first)  # 4., 5.
        record: Record = {"task": task, "doc_id": doc_id, "rank": self.rank,
                          "device": str(self.device), "threads": torch.get_num_threads(),
                          "greedy": out.greedy, "stats": sample_stats(out.result),
                          **out.extras, "text_match": out.greedy_match,
                          "baseline": None if out.baseline is None else sample_stats(out.baseline),
                          "baseline_first": ar_first,
                          "mismatch": None if out.mismatch is None else out.mismatch.to_dict()}
        if out.greedy_match is False:
            log_mismatch(task, doc_id, out.mismatch, out.text, out.baseline_text)
        counts = TokenCounts(input_tokens=len(prompt.input_ids), output_tokens=len(out.tokens))
        self.cache_hook.add_partial("generate_until", (req.args[0], gen_kwargs), out.text)
        return out.text, record, counts                                             # 6.

    def _check_length(self, task: str, doc_id: int, cfg: GenerationConfig, prompt_len: int
                      ) -> None:
        """An overlong prompt fails before decoding; a budget past the target's positions is
        clipped by the core (both decodes alike), with one warning per task."""
        try:
            budget = cfg.budget(prompt_len)
        except ValueError as e:
            raise ValueError(f"{task} doc {doc_id}: {e}") from None
        if budget < cfg.max_new_tokens and task not in self._clipped_tasks:
            self._clipped_tasks.add(task)
            eval_logger.warning(f"{task}: max_new_tokens={cfg.max_new_tokens} does not fit in the "
                                f"target's {cfg.max_length} positions; requests stop at the limit "
                                f"(doc {doc_id}: {budget} new tokens after {prompt_len}); "
                                f"warned once per task")

    def _request_inputs(self, req: Instance) -> RequestInputs:
        if self.is_simple:
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            visuals = doc_to_visual(doc) if doc_to_visual is not None else []
            return RequestInputs(ctx, _images(visuals, f"{task} doc {doc_id}"), dict(gen_kwargs),
                                 task, int(doc_id))
        _ctx, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
        try:
            messages, images = messages_and_images(
                doc_to_messages(self.task_dict[task][split][doc_id]), None)
        except NotImplementedError as e:  # a video or audio part: say which task
            raise NotImplementedError(f"{task} doc {doc_id}: only image inputs are supported "
                                      f"({e})") from None
        return RequestInputs(messages, images, dict(gen_kwargs), task, int(doc_id))

    # ------------------------------------------------------------------ reporting
    def _report(self, records: list[Record]) -> None:
        everyone = gather(records)
        if not self.accelerator.is_main_process:
            return
        extra = {"threads": torch.get_num_threads(), "world_size": self.world_size}
        startup = self.decoder.startup
        log_speed(everyone, {**extra, **(startup.metrics() if startup else {})})
        path = Path(self.settings.stats_path) if self.settings.stats_path else results_dir_jsonl()
        if path is not None:
            write_jsonl(path, everyone)
            eval_logger.info(f"per-sample speed statistics: {path}")


def _both(first: StepObserver, second: StepObserver) -> StepObserver:
    """One observer that calls ``first``, then ``second``."""

    def observe(tree: DraftTree, target_logits: torch.Tensor, verdict: Verdict) -> None:
        first(tree, target_logits, verdict)
        second(tree, target_logits, verdict)

    return observe


def log_mismatch(task: str, doc_id: int, found: Mismatch | None, text: str,
                 base_text: str | None) -> None:
    """A greedy mismatch in the log: a numerical tie is a warning, a real (or undiagnosed)
    mismatch an error (``mismatch.py``)."""
    log = eval_logger.warning if found is not None and found.kind == "tie" else eval_logger.error
    where = "" if found is None else (
        f" at token {found.position} ({found.kind}: top-2 logit gap sd {found.gap_sd}, ar "
        f"{found.gap_ar}, tolerance {found.tolerance:.3g})")
    log(f"{task} doc {doc_id}: greedy speculative output differs from autoregressive{where}"
        f"\n  sd: {text!r}\n  ar: {base_text!r}")


def _padding(req: Instance) -> bool:
    """A duplicate the evaluator adds to even out ranks; its answer is thrown away."""
    return bool((req.metadata or {}).get("__padding_only__"))


def _pick_device(requested: str | None, accelerator: Accelerator) -> torch.device:
    """The requested device; a bare ``cuda`` means this process's GPU under multi-process."""
    if requested is None:
        return accelerator.device
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", accelerator.local_process_index)
    return device


def gpu_share(local_rank: int, local_processes: int, gpus: int) -> list[int]:
    """The GPUs process ``local_rank`` of ``local_processes`` on a node owns: an equal,
    contiguous share of the node's ``gpus``."""
    share = gpus // local_processes
    if share == 0:
        raise ValueError(f"device_map with {local_processes} processes on a node needs at least "
                         f"one GPU per process; {gpus} visible")
    return list(range(local_rank * share, (local_rank + 1) * share))


def process_max_memory(accelerator: Accelerator) -> dict[int | str, int] | None:
    """accelerate's ``max_memory`` limited to this process's GPUs (free memory of each); None
    without GPUs (``device_map`` then places everything on the CPU)."""
    if not torch.cuda.is_available():
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    owned = gpu_share(accelerator.local_process_index, local, torch.cuda.device_count())
    return {i: torch.cuda.mem_get_info(i)[0] for i in owned}


def _images(visuals: Any, where: str) -> list[Image.Image]:
    """lmms-eval visuals (None, an image, or a list, possibly nested, of images or None) -> a
    flat list of images; anything else (a video path, an audio dict) is an error naming
    ``where`` (the task and doc)."""
    flat: list[Any] = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        flat.extend(v if isinstance(v, (list, tuple)) else [v])
    flat = [v for v in flat if v is not None]
    for v in flat:
        if not isinstance(v, Image.Image):
            raise NotImplementedError(f"{where}: only image inputs are supported, got "
                                      f"{type(v).__name__} {str(v)[:60]!r} (a video or audio "
                                      f"task?)")
    return [v.convert("RGB") for v in flat]


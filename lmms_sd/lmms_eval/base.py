"""The lmms-eval model class shared by every speculative method.

One request, in order:
  1. inputs    simple requests: ``(ctx, gen_kwargs, doc_to_visual, doc_id, task, split)``;
               chat requests: ``(ctx, doc_to_messages, gen_kwargs, doc_id, task, split)``
  2. prompt    the target adapter's ``prepare`` applies the chat template and the processor
  3. settings  ``gen_kwargs`` -> ``GenerationConfig`` (max_new_tokens, temperature, top_p, top_k,
               do_sample, until; num_beams > 1 is an error)
  4. decode    the core loop with the method's drafter and tree builder (none with ``sd=off``)
  5. baseline  with ``baseline=true`` the same prompt again, autoregressively; a greedy mismatch
               is classified as a numerical tie or a real one (``mismatch.py``)
  6. record    per-request statistics; after the last request every rank gathers them and
               rank 0 reports them to lmms-eval and writes the per-sample JSONL (``speed.py``)
Requests the evaluator adds only to even out ranks (``__padding_only__``) are not decoded.
Errors propagate: a request that fails to decode fails the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from loguru import logger as eval_logger
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from PIL import Image
from tqdm import tqdm

from ..adapters import HFAdapter, load_adapter
from ..core.generate import GenerationConfig, StepObserver, generate
from ..core.generate import GenerationResult as CoreResult
from ..core.interfaces import Drafter, PromptInputs
from ..core.tree import DraftTree
from ..core.verify import Verdict
from ..trees import TreeBuilder, make_builder
from .args import CommonArgs, cut_at_stop, generation_config, parse_model_args, split_model_args
from .mismatch import GapRecorder, classify
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
    """Base of ``<family>_<method>`` model classes. A method sets ``Args`` (its settings),
    ``GROUPS`` (its ``<group>.<key>`` settings) and implements ``make_decoder``; a family sets
    ``family`` (what the target checkpoint must be); a chat variant sets ``is_simple = False``.
    Hooks called per request: ``start_request`` before decoding, ``request_extras`` after."""

    is_simple: ClassVar[bool] = True
    family: ClassVar[str] = ""
    Args: ClassVar[type[CommonArgs]] = CommonArgs
    GROUPS: ClassVar[tuple[str, ...]] = ("tree",)

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict[str, Any] | None = None) -> "SpeculativeLMM":
        """Like lmms-eval's, but values stay strings so our field types alone convert them."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **split_model_args(arg_string)})

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        self.settings, self.groups = parse_model_args(self.Args, model_args, self.GROUPS)
        self.configure()
        self.accelerator = Accelerator()
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        self._device = _pick_device(self.settings.device, self.accelerator)
        self.target = self.load(self.settings.pretrained)
        if self.target.family != self.family:
            raise ValueError(f"{type(self).__name__} needs a {self.family} target; "
                             f"{self.settings.pretrained} is a {self.target.family} checkpoint")
        self.drafter: Drafter | None = None
        self.builder: TreeBuilder | None = None
        if self.settings.sd:
            self.drafter, self.builder = self.make_decoder()

    # ------------------------------------------------------------------ method hooks
    def configure(self) -> None:
        """Check the method's own settings before anything is loaded (default: the tree)."""
        self.tree = make_builder(self.settings.tree, **self.groups["tree"])

    def make_decoder(self) -> tuple[Drafter, TreeBuilder]:
        """The drafter and the tree builder (``sd=on`` only)."""
        raise NotImplementedError

    def plan(self, tasks: list[str]) -> None:
        """The task of every request this ``generate_until`` call will decode, in order."""

    def start_request(self, task: str, cfg: GenerationConfig) -> StepObserver | None:
        """Set up the next request (``sd=on``); may return an observer of its verify steps."""
        return None

    def request_extras(self) -> dict[str, Any]:
        """Method-specific facts about the request just decoded, for its record; the key
        ``measured`` False keeps it out of the speed summary (e.g. calibration requests)."""
        return {}

    def load(self, path: str) -> HFAdapter:
        """An adapter for the checkpoint at ``path`` on this process's device."""
        return load_adapter(path, device=self._device, dtype=getattr(torch, self.settings.dtype),
                            attn_implementation=self.settings.attn_implementation)

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
            self.plan([req.task_name for req in requests if not _padding(req)])
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
    def _respond(self, req: Instance) -> tuple[str, Record, TokenCounts]:
        inputs = self._request_inputs(req)                                          # 1.
        task, doc_id, gen_kwargs = inputs.task, inputs.doc_id, inputs.gen_kwargs
        prompt = self.target.prepare(inputs.prompt, inputs.images)                  # 2.
        cfg = generation_config(gen_kwargs, default_max_new_tokens=self.settings.max_new_tokens,
                                eos_token_ids=self.target.eos_token_ids,
                                seed=self.settings.seed + doc_id)                    # 3.
        observer = self.start_request(task, cfg) if self.drafter is not None else None
        gaps = (GapRecorder(), GapRecorder()) if self.settings.baseline else None
        if gaps is not None:  # top-2 logit gaps of both runs, to diagnose a greedy mismatch
            observer = gaps[0] if observer is None else _both(observer, gaps[0])
        text, result = self._decode(prompt, cfg, self.drafter, observer)           # 4.
        extras = self.request_extras() if self.drafter is not None else {}
        record: Record = {"task": task, "doc_id": doc_id, "rank": self.rank,
                          "greedy": cfg.sampling.greedy, "stats": sample_stats(result),
                          **extras, "baseline": None, "text_match": None, "mismatch": None}
        if self.settings.baseline and extras.get("measured", True):                # 5.
            base_text, base = self._decode(prompt, cfg, None, gaps[1])
            record["baseline"] = sample_stats(base)
            if cfg.sampling.greedy:
                record["text_match"] = text == base_text
                if text != base_text:
                    record["mismatch"] = self._diagnose(task, doc_id, text, base_text, result,
                                                        base, gaps)
        counts = TokenCounts(input_tokens=len(prompt.input_ids), output_tokens=len(result.tokens))
        self.cache_hook.add_partial("generate_until", (req.args[0], gen_kwargs), text)
        return text, record, counts                                                 # 6.

    def _diagnose(self, task: str, doc_id: int, text: str, base_text: str, result: CoreResult,
                  base: CoreResult, gaps: tuple[GapRecorder, GapRecorder]) -> dict | None:
        """Classify a greedy mismatch (``mismatch.py``): a tie is a warning, a real one an error."""
        found = classify(result.tokens, base.tokens, *gaps, self.target.dtype)
        if found is None:
            return None
        log = eval_logger.warning if found.kind == "tie" else eval_logger.error
        log(f"{task} doc {doc_id}: greedy speculative output differs from autoregressive at "
            f"token {found.position} ({found.kind}: top-2 logit gap sd {found.gap_sd}, ar "
            f"{found.gap_ar}, tolerance {found.tolerance:.3g})\n  sd: {text!r}\n  ar: {base_text!r}")
        return found.to_dict()

    def _decode(self, prompt: PromptInputs, cfg: GenerationConfig, drafter: Drafter | None,
                observer: StepObserver | None = None) -> tuple[str, CoreResult]:
        """Speculatively with ``drafter``, or autoregressively without."""
        builder = self.builder if drafter is not None else None
        result = generate(self.target, prompt, cfg, drafter, builder, self.target.decode,
                          observer=observer)
        return cut_at_stop(self.target.decode(result.tokens), cfg.stop_strings), result

    def _request_inputs(self, req: Instance) -> RequestInputs:
        if self.is_simple:
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            visuals = doc_to_visual(doc) if doc_to_visual is not None else []
            return RequestInputs(ctx, _images(visuals), dict(gen_kwargs), task, int(doc_id))
        _ctx, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
        chat = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
        images, videos, audios = chat.extract_media()
        if videos or audios:
            raise NotImplementedError(f"{task} doc {doc_id}: only image inputs are supported")
        messages = [{"role": m["role"], "content": [_strip_media(c) for c in m["content"]]}
                    for m in chat.model_dump()["messages"]]
        return RequestInputs(messages, _images(images), dict(gen_kwargs), task, int(doc_id))

    # ------------------------------------------------------------------ reporting
    def _report(self, records: list[Record]) -> None:
        everyone = gather(records)
        if not self.accelerator.is_main_process:
            return
        log_speed(everyone)
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


def _images(visuals: Any) -> list[Image.Image]:
    """lmms-eval visuals (None, an image, or a list, possibly nested, of images or None) -> a
    flat list of images."""
    flat: list[Any] = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        flat.extend(v if isinstance(v, (list, tuple)) else [v])
    flat = [v for v in flat if v is not None]
    for v in flat:
        if not isinstance(v, Image.Image):
            raise NotImplementedError(f"only PIL image inputs are supported, got "
                                      f"{type(v).__name__}")
    return [v.convert("RGB") for v in flat]


def _strip_media(content: dict[str, Any]) -> dict[str, Any]:
    """A chat content item for the chat template: images become ``{"type": "image"}`` (the
    images themselves go to the processor in order)."""
    if content["type"] == "image":
        return {"type": "image"}
    return {"type": "text", "text": content["text"]}

"""The speculative methods: settings in, a drafter and a tree builder out.

method          drafter (``draft=`` / ``drafts=``)                        settings
sd              a small draft VLM, or a text-only LM sharing the tokenizer  ``args.SDArgs``
msd             an MSD / EAGLE-2 draft head on the target's features         ``args.MSDArgs``
msd_calibrated  the MSD head + grouped isotonic calibrator + OPT-Tree        ``MSDCalibratedArgs``
cascade         CS Drafting's cascade of drafts down to MaG                  ``args.CascadeArgs``
eagle3          an EAGLE-3 head on the target's low / middle / high layers   ``args.Eagle3Args``

A model name is ``<family>_<method>`` (``llava_msd``, ``qwen2_vl_cascade``, ...): the lmms-eval
classes and ``lmms_sd.load`` both build their decoder from a ``Method`` of this module, which
knows nothing of lmms-eval. ``Method.parse`` checks every setting before anything is loaded.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any, ClassVar

import torch

from .adapters import HFAdapter, check_same_vocab
from .adapters.hub import resolve_file
from .adapters.loading import VLM_FAMILIES
from .core.generate import GenerationConfig, StepObserver
from .core.interfaces import Drafter
from .drafters.bigram import BigramTable
from .drafters.cascade import CascadeBuilder, CascadeConfig, CascadeDrafter
from .drafters.eagle3 import Eagle3Config, bind_target_states, load_eagle3_drafter
from .drafters.model import ModelDrafter
from .drafters.msd import MSDConfig, MSDDrafter, load_msd_drafter
from .drafters.ngram import MaGConfig, MaGDrafter
from .lmms_eval.args import (CascadeArgs, CommonArgs, Eagle3Args, MSDArgs, MSDCalibratedArgs,
                             SDArgs, from_mapping, parse_model_args)
from .lmms_eval.names import model_classes
from .trees import AutoConfig, TreeBuilder, auto_config, make_builder

FAMILIES = tuple(VLM_FAMILIES)  # llava, qwen2_vl, qwen2_5_vl, qwen3_vl, llava_onevision
Loader = Callable[[str], HFAdapter]  # a checkpoint path -> an adapter on the target's device


class Method:
    """One method's settings and, once ``make_decoder`` ran, its drafter. Per-request hooks:
    ``plan`` (the tasks to come), ``start_request`` before decoding, ``request_extras`` after."""

    Args: ClassVar[type[CommonArgs]] = CommonArgs
    GROUPS: ClassVar[tuple[str, ...]] = ("tree",)

    def __init__(self, settings: CommonArgs, groups: dict[str, dict[str, object]], name: str):
        self.settings, self.groups, self.name = settings, groups, name
        self.configure()

    @classmethod
    def parse(cls, values: Mapping[str, object], name: str) -> "Method":
        """The method named ``name`` (for messages) with ``values`` as ``model_args`` keys."""
        settings, groups = parse_model_args(cls.Args, values, cls.GROUPS)
        return cls(settings, groups, name)

    def configure(self) -> None:
        """Check the method's own settings before anything is loaded (default: the tree;
        ``tree=auto`` and its special cases leave the builder to the start-up plan)."""
        self.auto = auto_config(self.settings.tree, **self.groups["tree"])
        self.tree = None if self.auto else make_builder(self.settings.tree, **self.groups["tree"])

    def make_decoder(self, target: HFAdapter, load: Loader) -> tuple[Drafter, TreeBuilder]:
        raise NotImplementedError

    def plan(self, tasks: list[str]) -> None:
        """The task of every request about to be decoded, in order."""

    def start_request(self, task: str, cfg: GenerationConfig) -> StepObserver | None:
        """Set up the next request; may return an observer of its verify steps."""
        return None

    def request_extras(self) -> dict[str, Any]:
        """Facts about the request just decoded; ``measured`` False keeps it out of speed
        summaries and baselines (e.g. calibration requests)."""
        return {}

    def need(self, value: Any, key: str) -> Any:
        if not value:
            raise ValueError(f"{self.name} needs {key}=... (or sd=off)")
        return value


def _model_drafter(target: HFAdapter, load: Loader, path: str,
                   text_only: bool = False) -> ModelDrafter:
    """A draft model for ``target``; a text-only LM never sees the image."""
    draft = load(path)
    check_same_vocab(target, draft)
    return ModelDrafter(draft, text_only=text_only or draft.family == "causal_lm",
                        vocab_size=target.vocab_size)


class ModelDraft(Method):
    """Classic speculative decoding with a separate draft model."""

    Args = SDArgs

    def make_decoder(self, target: HFAdapter, load: Loader) -> tuple[Drafter, TreeBuilder]:
        s = self.settings
        drafter = _model_drafter(target, load, self.need(s.draft, "draft"), s.draft_text_only)
        return drafter, self.tree


class MSD(Method):
    """An MSD / EAGLE-2 head drafting from the target's own features."""

    Args = MSDArgs

    def make_decoder(self, target: HFAdapter, load: Loader) -> tuple[Drafter, TreeBuilder]:
        return self.msd_drafter(target), self.tree

    def msd_drafter(self, target: HFAdapter) -> MSDDrafter:
        """The head bound to ``target``, in the target's dtype unless ``draft_dtype`` is set."""
        s = self.settings
        dtype = None if s.draft_dtype == "auto" else getattr(torch, s.draft_dtype)
        return load_msd_drafter(self.need(s.draft, "draft"), target.model,
                                cfg=MSDConfig(positions=s.positions),
                                check_embeddings=s.check_embeddings, dtype=dtype)


class MSDCalibrated(MSD):
    """The MSD head under the Calibrated OPT-Tree (``lmms_sd.calibration.online``): online with
    ``cal.train_ratio`` (each task's first requests collect traces and are not measured; a
    calibrator is fitted per task; the rest are decoded with it and measured), or offline with
    ``cal.calibrator=PATH``. Task shares are counted per rank under several processes."""

    Args = MSDCalibratedArgs
    GROUPS = ("cal",)

    def configure(self) -> None:
        from .calibration.online import CalibratedSettings  # deferred: sklearn takes seconds

        self.calibration = from_mapping(CalibratedSettings, self.groups["cal"],
                                        what="cal settings")

    def make_decoder(self, target: HFAdapter, load: Loader) -> tuple[Drafter, TreeBuilder]:
        from .calibration.online import make_calibrated

        drafter, builder, self.session = make_calibrated(
            self.msd_drafter(target), self.calibration, target.tokenizer, target.vocab_size)
        return drafter, builder

    def plan(self, tasks: list[str]) -> None:
        self.session.plan(Counter(tasks))

    def start_request(self, task: str, cfg: GenerationConfig) -> StepObserver | None:
        self.session.start_request(task, cfg.sampling)
        return self.session.observe

    def request_extras(self) -> dict[str, Any]:
        phase = self.session.phases[-1]
        return {"measured": phase.measured, "calibrated": phase.calibrated}


# EAGLE-3's published tree (SafeAILab/EAGLE ``EaModel.from_pretrained``: total_token=60,
# depth=7, top_k=10); ``total_tokens`` counts the root, as MSD's
EAGLE3_TREE = {"depth": 7, "top_k": 10, "total_tokens": 60}


class Eagle3(Method):
    """An EAGLE-3 head; the target adapter is told to return the head's layer states."""

    Args = Eagle3Args

    def configure(self) -> None:
        if self.settings.tree == "dynamic":
            self.groups["tree"] = {**EAGLE3_TREE, **self.groups["tree"]}
        super().configure()

    def make_decoder(self, target: HFAdapter, load: Loader) -> tuple[Drafter, TreeBuilder]:
        s = self.settings
        dtype = None if s.draft_dtype == "auto" else getattr(torch, s.draft_dtype)
        cfg = Eagle3Config(positions=s.positions, decouple_images=s.decouple_images)
        drafter = load_eagle3_drafter(self.need(s.draft, "draft"), target.model, cfg=cfg,
                                      check_embeddings=s.check_embeddings, dtype=dtype)
        bind_target_states(target, drafter.head)
        return drafter, self.tree


class Cascade(Method):
    """CS Drafting: ``drafts`` from large to small, each reviewed by the ones below it."""

    Args = CascadeArgs

    def configure(self) -> None:
        if self.settings.tree != "cascade":
            super().configure()
        elif self.groups["tree"]:
            raise ValueError(f"tree=cascade takes no settings, got {sorted(self.groups['tree'])}")
        else:
            self.tree = CascadeBuilder()

    def make_decoder(self, target: HFAdapter, load: Loader) -> tuple[Drafter, TreeBuilder]:
        s = self.settings
        drafts = [self._member(target, load, p) for p in self.need(s.drafts, "drafts")]
        k_matrix = parse_k_matrix(s.k_matrix) if s.k_matrix.strip() else None
        cfg = CascadeConfig.published(len(drafts), k_matrix, s.lenience, s.bottom_tokens)
        self.drafter = CascadeDrafter(drafts, cfg)
        return self.drafter, self.tree

    def request_extras(self) -> dict[str, Any]:
        return {"cascade": asdict(self.drafter.counts())}

    def _member(self, target: HFAdapter, load: Loader, path: str) -> Drafter:
        if path != "mag":
            return _model_drafter(target, load, path)
        table = None
        if self.settings.bigram:
            table = BigramTable.load(resolve_file(self.settings.bigram))
            table.check_vocab(target.tokenizer, target.vocab_size)
        return MaGDrafter(target.vocab_size, table, MaGConfig(match=self.settings.mag_match))


def parse_k_matrix(text: str) -> list[list[int]]:
    """``"4 2;0 3"`` -> ``[[4, 2], [0, 3]]``."""
    try:
        return [[int(v) for v in row.split()] for row in text.split(";") if row.strip()]
    except ValueError:
        raise ValueError(f"k_matrix={text!r}: rows separated by ';', integers by spaces, "
                         f"e.g. '4 2;0 3'") from None


METHODS: dict[str, type[Method]] = {"sd": ModelDraft, "msd": MSD,
                                    "msd_calibrated": MSDCalibrated, "cascade": Cascade,
                                    "eagle3": Eagle3}
MODEL_NAMES = tuple(name for name, *_ in model_classes())


def method_class(method: str) -> type[Method]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return METHODS[method]


def split_model_name(name: str) -> tuple[str, str]:
    """``"qwen2_vl_msd"`` -> ``("qwen2_vl", "msd")``."""
    for model, family, method, _ in model_classes():
        if model == name:
            return family, method
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")

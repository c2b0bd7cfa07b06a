"""The named lmms-eval model classes: ``<family>_<method>``, each in a simple and a chat variant.

method          drafter (``draft=`` / ``drafts=``)                        settings
sd              a small draft VLM, or a text-only LM sharing the tokenizer  ``args.SDArgs``
msd             an MSD / EAGLE-2 draft head on the target's features         ``args.MSDArgs``
msd_calibrated  the MSD head + grouped isotonic calibrator + OPT-Tree        ``MSDCalibratedArgs``
cascade         CS Drafting's cascade of drafts down to MaG                  ``args.CascadeArgs``
Every class accepts ``sd=off`` (the same wrapper, decoding autoregressively) and
``baseline=true`` (both, in the same process).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import Any

from ..adapters import check_same_vocab
from ..adapters.hub import resolve_file
from ..calibration.online import CalibratedSettings, make_calibrated
from ..core.generate import GenerationConfig, StepObserver
from ..core.interfaces import Drafter
from ..drafters.bigram import BigramTable
from ..drafters.cascade import CascadeBuilder, CascadeConfig, CascadeDrafter
from ..drafters.model import ModelDrafter
from ..drafters.msd import MSDConfig, MSDDrafter, load_msd_drafter
from ..drafters.ngram import MaGDrafter
from ..trees import TreeBuilder
from .args import CascadeArgs, MSDArgs, MSDCalibratedArgs, SDArgs, from_mapping
from .base import SpeculativeLMM


def _need(value: Any, name: str, model: SpeculativeLMM) -> Any:
    if not value:
        raise ValueError(f"{type(model).__name__} needs {name}=... (or sd=off)")
    return value


def _model_drafter(lmm: SpeculativeLMM, path: str, text_only: bool = False) -> ModelDrafter:
    """A draft model for ``lmm``'s target; a text-only LM never sees the image."""
    draft = lmm.load(path)
    check_same_vocab(lmm.target, draft)
    return ModelDrafter(draft, text_only=text_only or draft.family == "causal_lm",
                        vocab_size=lmm.target.vocab_size)


class _ModelDraft(SpeculativeLMM):
    """Classic speculative decoding with a separate draft model."""

    Args = SDArgs

    def make_decoder(self) -> tuple[Drafter, TreeBuilder]:
        s = self.settings
        return _model_drafter(self, _need(s.draft, "draft", self), s.draft_text_only), self.tree


class _MSD(SpeculativeLMM):
    """An MSD / EAGLE-2 head drafting from the target's own features."""

    Args = MSDArgs

    def make_decoder(self) -> tuple[Drafter, TreeBuilder]:
        return _msd_drafter(self), self.tree


def _msd_drafter(lmm: SpeculativeLMM) -> MSDDrafter:
    """The MSD head at ``draft=`` bound to ``lmm``'s target model."""
    s = lmm.settings
    return load_msd_drafter(_need(s.draft, "draft", lmm), lmm.target.model,
                            cfg=MSDConfig(positions=s.positions),
                            check_embeddings=s.check_embeddings, dtype=lmm.draft_dtype)


class _Cascade(SpeculativeLMM):
    """CS Drafting: ``drafts`` from large to small, each reviewed by the ones below it."""

    Args = CascadeArgs

    def configure(self) -> None:
        if self.settings.tree != "cascade":
            super().configure()
        elif self.groups["tree"]:
            raise ValueError(f"tree=cascade takes no settings, got {sorted(self.groups['tree'])}")
        else:
            self.tree = CascadeBuilder()

    def make_decoder(self) -> tuple[Drafter, TreeBuilder]:
        s = self.settings
        drafts = [self._member(path) for path in _need(s.drafts, "drafts", self)]
        cfg = CascadeConfig.of(parse_k_matrix(s.k_matrix), s.lenience)
        return CascadeDrafter(drafts, cfg), self.tree

    def request_extras(self) -> dict[str, Any]:
        return {"cascade": asdict(self.drafter.counts())}

    def _member(self, path: str) -> Drafter:
        if path != "mag":
            return _model_drafter(self, path)
        bigram = self.settings.bigram
        table = BigramTable.load(resolve_file(bigram)) if bigram else None
        return MaGDrafter(self.target.vocab_size, table)


def parse_k_matrix(text: str) -> list[list[int]]:
    """``"4 2;0 3"`` -> ``[[4, 2], [0, 3]]``."""
    try:
        return [[int(v) for v in row.split()] for row in text.split(";") if row.strip()]
    except ValueError:
        raise ValueError(f"k_matrix={text!r}: rows separated by ';', integers by spaces, "
                         f"e.g. '4 2;0 3'") from None


class _MSDCalibrated(SpeculativeLMM):
    """The MSD head under the Calibrated OPT-Tree (``lmms_sd.calibration.online``): online with
    ``cal.train_ratio`` (each task's first requests collect traces and are not measured; a
    calibrator is fitted per task; the rest are decoded with it and measured), or offline with
    ``cal.calibrator=PATH``. Task shares are counted per rank under several processes."""

    Args = MSDCalibratedArgs
    GROUPS = ("cal",)

    def configure(self) -> None:
        # The MSD head cannot report its image attention yet (recording.with_attention_tap
        # supports draft models only): attention features are 0 unless asked for explicitly.
        params = {"attention": "false", **self.groups["cal"]}
        self.calibration = from_mapping(CalibratedSettings, params, what="cal settings")

    def make_decoder(self) -> tuple[Drafter, TreeBuilder]:
        drafter, builder, self.session = make_calibrated(
            _msd_drafter(self), self.calibration, self.target.tokenizer, self.target.vocab_size)
        return drafter, builder

    def plan(self, tasks: list[str]) -> None:
        self.session.plan(Counter(tasks))

    def start_request(self, task: str, cfg: GenerationConfig) -> StepObserver | None:
        self.session.start_request(task, cfg.sampling)
        return self.session.observe

    def request_extras(self) -> dict[str, Any]:
        phase = self.session.phases[-1]
        return {"measured": phase.measured, "calibrated": phase.calibrated}


class LlavaSD(_ModelDraft):
    family = "llava"


class LlavaSDChat(LlavaSD):
    is_simple = False


class Qwen2VLSD(_ModelDraft):
    family = "qwen2_vl"


class Qwen2VLSDChat(Qwen2VLSD):
    is_simple = False


class LlavaMSD(_MSD):
    family = "llava"


class LlavaMSDChat(LlavaMSD):
    is_simple = False


class Qwen2VLMSD(_MSD):
    family = "qwen2_vl"


class Qwen2VLMSDChat(Qwen2VLMSD):
    is_simple = False


class LlavaMSDCalibrated(_MSDCalibrated):
    family = "llava"


class LlavaMSDCalibratedChat(LlavaMSDCalibrated):
    is_simple = False


class Qwen2VLMSDCalibrated(_MSDCalibrated):
    family = "qwen2_vl"


class Qwen2VLMSDCalibratedChat(Qwen2VLMSDCalibrated):
    is_simple = False


class LlavaCascade(_Cascade):
    family = "llava"


class LlavaCascadeChat(LlavaCascade):
    is_simple = False


class Qwen2VLCascade(_Cascade):
    family = "qwen2_vl"


class Qwen2VLCascadeChat(Qwen2VLCascade):
    is_simple = False

"""The named lmms-eval model classes: ``<family>_<method>``, each in a simple and a chat variant.

method           drafter                                            status
sd               a small draft VLM, or a text-only LM (draft_text_only=true)   wired
msd              MSD / EAGLE-style draft head on target features    needs lmms_sd.drafters.msd_head
msd_calibrated   MSD head + grouped isotonic calibrator + OPT-Tree  needs the MSD head + calibration
cascade          CS-Drafting cascade of drafts down to n-gram       needs lmms_sd.drafters.cascade
Every class accepts ``sd=off`` (the same wrapper, decoding autoregressively) and
``baseline=true`` (both, in the same process); see ``args.SDArgs`` for all keys.
"""
from __future__ import annotations

from typing import Any

from ..adapters import check_same_vocab
from ..core.interfaces import Drafter
from ..drafters.model import ModelDrafter
from .base import SpeculativeLMM


class _ModelDraft(SpeculativeLMM):
    """Classic speculative decoding with a separate draft model (``draft=<checkpoint>``): a
    small VLM of the target's family, or a text-only LM sharing its tokenizer."""

    def make_drafter(self) -> Drafter:
        if self.settings.draft is None:
            raise ValueError(f"{type(self).__name__} needs draft=<draft checkpoint> (or sd=off)")
        draft = self.load(self.settings.draft)
        check_same_vocab(self.target, draft)
        text_only = self.settings.draft_text_only or draft.family == "causal_lm"
        return ModelDrafter(draft, text_only=text_only, vocab_size=self.target.vocab_size)


class _NotYet(SpeculativeLMM):
    """A method whose drafter has not landed: construction fails naming the missing piece."""

    missing = ""

    def __init__(self, **model_args: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__}: {self.missing} is not implemented yet")


class _MSD(_NotYet):
    missing = "the MSD draft head (lmms_sd/drafters/msd_head.py)"


class _MSDCalibrated(_NotYet):
    missing = "the MSD draft head with the calibrated OPT-Tree (lmms_sd/calibration, lmms_sd/trees)"


class _Cascade(_NotYet):
    missing = "the cascade drafter (lmms_sd/drafters/cascade.py)"


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

"""The named lmms-eval model classes: ``<family>_<method>``, each in a simple and a chat variant.

The methods (``sd``, ``msd``, ``msd_calibrated``, ``cascade``, ``eagle3``), their settings and drafters are
``lmms_sd.methods``; the classes only name a family and a method. Every class accepts ``sd=off``
(the same wrapper, decoding autoregressively) and ``baseline=true`` (both, in the same process).
"""
from __future__ import annotations

from .base import SpeculativeLMM


class LlavaSD(SpeculativeLMM):
    family, method = "llava", "sd"


class LlavaSDChat(LlavaSD):
    is_simple = False


class Qwen2VLSD(SpeculativeLMM):
    family, method = "qwen2_vl", "sd"


class Qwen2VLSDChat(Qwen2VLSD):
    is_simple = False


class LlavaMSD(SpeculativeLMM):
    family, method = "llava", "msd"


class LlavaMSDChat(LlavaMSD):
    is_simple = False


class Qwen2VLMSD(SpeculativeLMM):
    family, method = "qwen2_vl", "msd"


class Qwen2VLMSDChat(Qwen2VLMSD):
    is_simple = False


class LlavaMSDCalibrated(SpeculativeLMM):
    family, method = "llava", "msd_calibrated"


class LlavaMSDCalibratedChat(LlavaMSDCalibrated):
    is_simple = False


class Qwen2VLMSDCalibrated(SpeculativeLMM):
    family, method = "qwen2_vl", "msd_calibrated"


class Qwen2VLMSDCalibratedChat(Qwen2VLMSDCalibrated):
    is_simple = False


class LlavaCascade(SpeculativeLMM):
    family, method = "llava", "cascade"


class LlavaCascadeChat(LlavaCascade):
    is_simple = False


class Qwen2VLCascade(SpeculativeLMM):
    family, method = "qwen2_vl", "cascade"


class Qwen2VLCascadeChat(Qwen2VLCascade):
    is_simple = False


class LlavaEagle3(SpeculativeLMM):
    family, method = "llava", "eagle3"


class LlavaEagle3Chat(LlavaEagle3):
    is_simple = False


class Qwen2VLEagle3(SpeculativeLMM):
    family, method = "qwen2_vl", "eagle3"


class Qwen2VLEagle3Chat(Qwen2VLEagle3):
    is_simple = False

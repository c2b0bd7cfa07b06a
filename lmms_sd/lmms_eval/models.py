"""The named lmms-eval model classes: ``<family>_<method>``, each in a simple and a chat variant.

The methods (``sd``, ``msd``, ``msd_calibrated``, ``cascade``, ``eagle3``), their settings and drafters are
``lmms_sd.methods``; the classes only name a family and a method, so they are made here for every
pair of ``names.FAMILY_PREFIX`` x ``names.METHOD_SUFFIX`` (``LlavaSD`` / ``LlavaSDChat`` for
``llava_sd``, ``Qwen2_5_VLMSD`` for ``qwen2_5_vl_msd``, ...). Every class accepts ``sd=off``
(the same wrapper, decoding autoregressively) and ``baseline=true`` (both, in the same process).
"""
from __future__ import annotations

from .base import SpeculativeLMM
from .names import model_classes

for _model, _family, _method, _name in model_classes():
    globals()[_name] = type(_name, (SpeculativeLMM,), {"family": _family, "method": _method,
                                                       "__module__": __name__})
    globals()[_name + "Chat"] = type(_name + "Chat", (globals()[_name],),
                                     {"is_simple": False, "__module__": __name__})

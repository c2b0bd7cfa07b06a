"""lmms_sd: speculative decoding for vision-language models, measured inside lmms-eval.

Standalone use: ``lmms_sd.load(target, method=..., draft=...)`` returns a decoder whose
``generate(images, prompt)`` answers with statistics (``lmms_sd.api``); ``lmms_sd.csd`` is CS
Drafting's entry point. Both are imported on first use: lmms-eval imports this package to find
its model classes and must not pay for torch here.
"""
from typing import Any

__version__ = "0.1.0"
_LAZY = {"load": "api", "open_model": "api", "Speculator": "api", "Generation": "api",
         "csd": "drafters.cascade"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lmms_sd' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)

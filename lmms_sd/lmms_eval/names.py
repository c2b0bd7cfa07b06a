"""The model names lmms-eval resolves, without heavy imports (``registry`` is read when
``lmms_eval.models`` is imported): ``<family>_<method>`` -> class ``<Prefix><Suffix>``."""
from __future__ import annotations

# family (a key of ``adapters.loading.VLM_FAMILIES``) -> class-name prefix
FAMILY_PREFIX = {"llava": "Llava", "qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL",
                 "qwen3_vl": "Qwen3VL", "llava_onevision": "LlavaOnevision"}
# method (a key of ``methods.METHODS``) -> class-name suffix
METHOD_SUFFIX = {"sd": "SD", "msd": "MSD", "msd_calibrated": "MSDCalibrated",
                 "cascade": "Cascade", "eagle3": "Eagle3"}
# methods built for some families only: EAGLE-3 heads have Llama and Qwen2(.5)-VL layers
METHOD_FAMILIES = {"eagle3": ("llava", "qwen2_vl", "qwen2_5_vl")}


def model_classes() -> list[tuple[str, str, str, str]]:
    """(model name, family, method, simple class name) of every model, methods first; the chat
    class name adds ``Chat``."""
    return [(f"{family}_{method}", family, method, prefix + suffix)
            for method, suffix in METHOD_SUFFIX.items() for family, prefix in FAMILY_PREFIX.items()
            if family in METHOD_FAMILIES.get(method, FAMILY_PREFIX)]

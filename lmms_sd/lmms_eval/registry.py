"""The ``lmms_eval.models`` entry point: the names lmms-eval resolves to our model classes.

lmms-eval 0.7.3 loads ``MANIFESTS`` when ``lmms_eval.models`` is imported (a failure there is
only logged as a warning, so this module must stay free of heavy imports). It picks the chat
class unless ``--force_simple`` is given. The classes live in ``lmms_sd.lmms_eval.models``.
"""
from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest


def _manifest(model_id: str, class_name: str) -> ModelManifest:
    module = "lmms_sd.lmms_eval.models"
    return ModelManifest(model_id=model_id, simple_class_path=f"{module}.{class_name}",
                         chat_class_path=f"{module}.{class_name}Chat")


MANIFESTS: list[ModelManifest] = [
    _manifest("llava_sd", "LlavaSD"),
    _manifest("qwen2_vl_sd", "Qwen2VLSD"),
    _manifest("llava_msd", "LlavaMSD"),
    _manifest("qwen2_vl_msd", "Qwen2VLMSD"),
    _manifest("llava_msd_calibrated", "LlavaMSDCalibrated"),
    _manifest("qwen2_vl_msd_calibrated", "Qwen2VLMSDCalibrated"),
    _manifest("llava_cascade", "LlavaCascade"),
    _manifest("qwen2_vl_cascade", "Qwen2VLCascade"),
    _manifest("llava_eagle3", "LlavaEagle3"),
    _manifest("qwen2_vl_eagle3", "Qwen2VLEagle3"),
]

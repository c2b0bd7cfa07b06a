"""The ``lmms_eval.models`` entry point: the names lmms-eval resolves to our model classes.

lmms-eval 0.7.3 loads ``MANIFESTS`` when ``lmms_eval.models`` is imported (a failure there is
only logged as a warning, so this module must stay free of heavy imports). It picks the chat
class unless ``--force_simple`` is given. The classes live in ``lmms_sd.lmms_eval.models``;
the names in ``names.py``.
"""
from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

from .names import model_classes


def _manifest(model_id: str, class_name: str) -> ModelManifest:
    module = "lmms_sd.lmms_eval.models"
    return ModelManifest(model_id=model_id, simple_class_path=f"{module}.{class_name}",
                         chat_class_path=f"{module}.{class_name}Chat")


MANIFESTS: list[ModelManifest] = [_manifest(model_id, name)
                                  for model_id, _family, _method, name in model_classes()]

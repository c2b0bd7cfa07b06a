"""Models shipped inside the package, so tests and the offline demo never train.

    lmms_sd/assets/shapes/<family>/<role>/   save_pretrained weights + processor or tokenizer
    lmms_sd/assets/shapes/<family>/metrics.json   how they were trained and what they measure
    lmms_sd/assets/shapes/<family>/calibrator_msd_head.json   the acceptance calibrator of the
                                                  MSD head (``*_msd_calibrated``, offline mode)

Families: ``llava``, ``qwen2_vl``. Roles: ``target`` (the VLM), ``draft_vlm`` (a 1-layer draft
of the same family), ``text_only`` (a Llama / Qwen2 draft that never sees the image); later
trainers may add roles. Built by ``python -m lmms_sd.train.shapes_models`` (see model_cards/).
"""
from __future__ import annotations

import json
from pathlib import Path

SHAPES_DIR = Path(__file__).resolve().parent / "shapes"


def shipped_models() -> dict[str, list[str]]:
    """Every shipped model: family -> sorted roles (directories holding a ``config.json``)."""
    if not SHAPES_DIR.is_dir():
        return {}
    return {family.name: sorted(r.name for r in family.iterdir() if (r / "config.json").is_file())
            for family in sorted(SHAPES_DIR.iterdir()) if family.is_dir()}


def shipped_model(family: str, role: str) -> Path:
    """The directory of a shipped shapes model, for ``load_adapter``.

    Raises FileNotFoundError naming what is shipped when (family, role) is not."""
    path = SHAPES_DIR / family / role
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no shipped shapes model for family {family!r}, role {role!r}; "
                                f"shipped: {shipped_models() or 'none'}")
    return path


def shipped_metrics(family: str) -> dict:
    """The ``metrics.json`` of a shipped family: recipe, training records, measured figures."""
    path = SHAPES_DIR / family / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped metrics for family {family!r}; "
                                f"shipped: {shipped_models() or 'none'}")
    return json.loads(path.read_text())


CALIBRATOR_FILE = "calibrator_msd_head.json"


def shipped_calibrator(family: str) -> Path:
    """The calibrator fitted on the shipped MSD head's traces (``cal.calibrator=``)."""
    path = SHAPES_DIR / family / CALIBRATOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no shipped calibrator for family {family!r} at {path}")
    return path

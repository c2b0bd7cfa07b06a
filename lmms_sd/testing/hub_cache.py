"""A Hugging Face hub cache laid out by hand, so tests resolve ``ORG/NAME`` offline.

The layout ``huggingface_hub`` reads: ``<cache>/models--ORG--NAME/snapshots/<40 hex>/<files>``
and ``<cache>/models--ORG--NAME/refs/<revision>`` holding the commit hash. ``use_cache``
points ``huggingface_hub`` (which reads its constants at import) at such a cache.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest


def put_in_cache(folder: Path, repo_id: str, cache: Path, revision: str = "main") -> Path:
    """Copy ``folder``'s files into ``cache`` as snapshot ``revision`` of ``repo_id``; returns
    the snapshot folder."""
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def use_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """Offline resolution from ``cache`` for the rest of the test."""
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

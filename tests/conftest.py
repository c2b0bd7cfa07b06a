"""Shared fixtures: the tiny model suites, built once per test session.

``tiny_paths[family][role]`` are saved model directories (roles: target, draft_vlm,
text_only) of the two original families (``BASE_FAMILIES``: most tests run on them);
``tiny_adapters[family][role]`` are adapters loaded from them. ``every_tiny_paths`` and
``every_tiny_adapters`` add the later families (all of ``FAMILIES``), for the tests that
cover every family (the losslessness table, the new-family tests). Adapters are shared
across tests: a test may prefill/forward/crop them (prefill resets the cache) but must not
change their weights. ``family`` parametrises a test over both families; ``target``,
``draft_vlm``, ``text_only`` and ``prompts`` follow it.
"""
from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

from pathlib import Path

import pytest
import torch

from lmms_sd.adapters import HFAdapter, load_adapter
from lmms_sd.core.interfaces import PromptInputs
from lmms_sd.testing.tiny import FAMILIES, ROLES, build_tiny_suite, tiny_prompts

torch.set_num_threads(1)


# (text, images) requests, also importable as lmms_sd.testing.tiny.tiny_prompts()
PROMPT_SPECS = tiny_prompts()


BASE_FAMILIES = ("llava", "qwen2_vl")


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("tiny_suite")
    return {family: build_tiny_suite(root, family, seed=0) for family in BASE_FAMILIES}


@pytest.fixture(scope="session")
def tiny_adapters(tiny_paths: dict[str, dict[str, Path]]) -> dict[str, dict[str, HFAdapter]]:
    return {family: {role: load_adapter(tiny_paths[family][role]) for role in ROLES}
            for family in BASE_FAMILIES}


@pytest.fixture(scope="session")
def every_tiny_paths(tiny_paths: dict[str, dict[str, Path]],
                     tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("tiny_suite_later")
    return {family: tiny_paths.get(family) or build_tiny_suite(root, family, seed=0)
            for family in FAMILIES}


@pytest.fixture(scope="session")
def every_tiny_adapters(tiny_adapters: dict[str, dict[str, HFAdapter]],
                        every_tiny_paths: dict[str, dict[str, Path]]
                        ) -> dict[str, dict[str, HFAdapter]]:
    return {family: tiny_adapters.get(family)
            or {role: load_adapter(every_tiny_paths[family][role]) for role in ROLES}
            for family in FAMILIES}


@pytest.fixture(scope="session", params=BASE_FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture()
def target(tiny_adapters: dict[str, dict[str, HFAdapter]], family: str) -> HFAdapter:
    return tiny_adapters[family]["target"]


@pytest.fixture()
def draft_vlm(tiny_adapters: dict[str, dict[str, HFAdapter]], family: str) -> HFAdapter:
    return tiny_adapters[family]["draft_vlm"]


@pytest.fixture()
def text_only(tiny_adapters: dict[str, dict[str, HFAdapter]], family: str) -> HFAdapter:
    return tiny_adapters[family]["text_only"]


@pytest.fixture()
def prompts(target: HFAdapter) -> list[PromptInputs]:
    """The ``PROMPT_SPECS`` prepared for the family's target (chat template applied)."""
    return [target.prepare(text, images) for text, images in PROMPT_SPECS]


def greedy_references(tiny_adapters: dict[str, dict[str, HFAdapter]], max_new: int
                      ) -> dict[str, list[tuple[PromptInputs, list[int]]]]:
    """Per family, every ``PROMPT_SPECS`` prompt prepared for the target, with the target's own
    greedy output from ``transformers``' ``generate``: what speculative output must equal."""
    refs = {}
    for family, adapters in tiny_adapters.items():
        target = adapters["target"]
        prompts = [target.prepare(text, images) for text, images in PROMPT_SPECS]
        refs[family] = [(p, target.hf_generate(p, max_new)) for p in prompts]
    return refs


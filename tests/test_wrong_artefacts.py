"""Wrong artefacts fail in seconds, before any allocation, under a 6 GiB address-space limit,
with a message that names the fix. Each case runs the loader calls the model classes make
(``SpeculativeLMM.load`` -> ``load_adapter(..., role, family)``; ``*_msd`` ->
``load_msd_head``) on folders whose configs are the published 7B ones: building any of them
from its config would need 14-28 GB."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmms_sd.testing import real_format as rf

FIXTURES = Path(__file__).parent / "fixtures" / "real"
LIMIT = 6 << 30
SCRIPT = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))
from lmms_sd.adapters.loading import load_adapter
from lmms_sd.drafters.msd_format import load_msd_head
f = json.loads(sys.argv[1])
target = load_adapter(f["target"]).model
cases = {
    "head_as_draft": lambda: load_adapter(f["head7b"], role="draft", family="llava"),
    "qwen_head_as_draft": lambda: load_adapter(f["qwen_head7b"], role="draft", family="qwen2_vl"),
    "draft_model_as_head": lambda: load_msd_head(f["vicuna"], target),
    "text_lm_as_target": lambda: load_adapter(f["vicuna"], role="target", family="llava"),
    "config_without_sizes": lambda: load_adapter(f["sizeless"], role="target", family="llava"),
    "draft_path_typo": lambda: load_adapter("/models/no-such-draft", role="draft"),
    "head_path_typo": lambda: load_msd_head("/models/no-such-head", target),
}
for name in sys.argv[2].split(","):
    t0 = time.perf_counter()
    try:
        cases[name]()
        out = {"error": None}
    except Exception as e:
        out = {"error": type(e).__name__, "message": str(e)}
    out.update(case=name, seconds=time.perf_counter() - t0)
    print("RESULT " + json.dumps(out), flush=True)
""".replace("LIMIT_BYTES", str(LIMIT))
EXPECTED = {
    "head_as_draft": ("ValueError", "give it to llava_msd as msd_model_path="),
    "qwen_head_as_draft": ("ValueError", "give it to qwen2_vl_msd as msd_model_path="),
    "draft_model_as_head": ("ValueError", "a draft model goes to the *_sd classes as draft="),
    "text_lm_as_target": ("ValueError", "text-only language model"),
    "config_without_sizes": ("ValueError", "initialise the rest at random from config defaults"),
    "draft_path_typo": ("FileNotFoundError", "no such folder"),
    "head_path_typo": ("FileNotFoundError", "no such folder"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("wrong")
    target = rf.build_llava_hf(FIXTURES, root / "llava")
    head = rf.build_msd_head(FIXTURES, target, root / "head")
    out = {"target": target, "vicuna": rf.build_vicuna(root / "vicuna")}
    for name, config in (("head7b", "MSD-LLaVA1.5-7B"), ("qwen_head7b", "MSD-Qwen2VL-7B-Instruct"),
                         ("sizeless", "llava-1.5-7b-hf")):
        out[name] = root / name
        shutil.copytree(head if "head" in name else target, out[name])
        shutil.copy(FIXTURES / config / "config.json", out[name] / "config.json")
    return {k: str(v) for k, v in out.items()}


def run(folders: dict[str, str], cases: list[str]) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(folders), ",".join(cases)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
    return {r["case"]: r for r in results} | {"_stderr": {"text": proc.stderr[-2000:]}}


def test_each_wrong_artefact_fails_in_seconds_under_6_gib(folders: dict[str, str]) -> None:
    results = run(folders, list(EXPECTED))
    for case, (error, message) in EXPECTED.items():
        assert case in results, results["_stderr"]["text"]
        got = results[case]
        assert got["error"] == error and message in got["message"], (case, got)
        assert got["seconds"] < 15, (case, got["seconds"])

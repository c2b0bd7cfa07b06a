"""The GPU check script's CPU dry run: tiny llava-hf shapes, every method, both kernels."""
from __future__ import annotations

import subprocess
from pathlib import Path

from lmms_sd.bench import gpu_check

ROOT = Path(__file__).parents[1]


def test_dry_run_is_lossless_and_reports(tmp_path: Path) -> None:
    report = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--prompts", "1",
                             "--new-tokens", "6"])
    methods = {(r["attn"], r["method"]) for r in report["rows"]}
    assert len(methods) == 12 and ("eager", "msd_head msd_tree") in methods
    assert all(r["mismatches"] in (0, None) for r in report["rows"])
    assert report["kernels_agree"] and report["loading"]["mismatches"] == 0
    assert report["loading"]["dtype"] == "torch.float32"  # dtype=auto on the CPU
    assert (tmp_path / "gpu_check.md").read_text().count("\n|") == 14  # header, rule, 12 rows


def test_shell_script_parses() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], check=True)

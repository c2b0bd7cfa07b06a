"""The package command line and the demo's command construction (the demo itself runs in CI
through the README's first command, not here)."""
from __future__ import annotations

import pytest

from lmms_sd import cli, demo


def test_tasks_dir_lists_the_shipped_tasks(capsys):
    assert cli.main(["tasks-dir"]) == 0
    from pathlib import Path

    path = Path(capsys.readouterr().out.strip())
    assert (path / "shapes" / "shapes_caption.yaml").is_file()
    assert (path / "sd_long" / "sd_coco_detail.yaml").is_file()


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


def test_demo_rejects_models_it_cannot_run():
    with pytest.raises(ValueError, match="the demo runs one of"):
        demo.command("llava_cascade", "shapes", 4, demo.Path("out"), 1)


def test_summary_table_reads_results_json():
    results = {"results": {"shapes_caption": {"content_acc,none": 0.9, "content_acc_stderr,none": 0.1}},
               "throughput": {"avg_tau": 3.5, "avg_shapes_caption/tau": 3.5, "avg_speedup": 1.8,
                              "avg_shapes_caption/speedup": 1.8, "avg_mismatches": 0, "avg_speed": 412.5}}
    table = demo.summary_table(results)
    row = next(line for line in table.splitlines() if line.startswith("| shapes_caption"))
    assert "0.900" in row and "3.5" in row and "1.8" in row
    last = table.splitlines()[-1]
    assert last.startswith("| all") and "| 0 |" in last and "412" in last


def test_demo_gives_the_calibrated_classes_the_shipped_calibrator():
    from lmms_sd.assets import CALIBRATOR_FILE, SHAPES_DIR

    assert demo.default_model_args("llava_msd") == "tree=auto"
    for family in ("llava", "qwen2_vl"):
        args = demo.default_model_args(f"{family}_msd_calibrated")
        assert args == f"cal.calibrator={SHAPES_DIR / family / CALIBRATOR_FILE}"
        cmd = demo.command(f"{family}_msd_calibrated", "shapes", 2, demo.Path("out"), 1, args)
        assert f"draft={SHAPES_DIR / family / 'msd_head'}" in cmd[cmd.index("--model_args") + 1]


def test_eval_exits_nonzero_when_lmms_eval_swallows_the_error(tmp_path):
    """lmms-eval's own CLI prints the traceback of a failed evaluation and exits 0; ``lmms-sd
    eval`` must exit 1 and say why (here: a target folder that does not exist)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "lmms_sd.cli", "eval", "--model", "llava_sd",
                          "--model_args", "pretrained=/nonexistent", "--tasks", "shapes_caption",
                          "--limit", "1", "--output_path", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "lmms-sd eval: the evaluation failed" in run.stderr
    assert "/nonexistent" in run.stderr
    assert not list(tmp_path.rglob("*_results.json"))

"""lmms-eval integration: speculative model classes that measure accuracy and speed in one run.

Install lmms_sd (``pip install -e .``) and lmms-eval finds the models through the entry point
group ``lmms_eval.models`` (``registry.MANIFESTS``): ``<family>_<method>`` for the families
``llava``, ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``, ``llava_onevision`` and the methods
``sd``, ``msd``, ``msd_calibrated``, ``cascade`` (``llava_sd``, ``qwen3_vl_msd``, ...), and
``eagle3`` for ``llava`` and ``qwen2_vl`` (``llava_eagle3``, ``qwen2_vl_eagle3``).

Tasks shipped in ``lmms_sd/tasks`` need ``--include_path``: lmms-eval 0.7.3 has no task entry
point, its ``TaskManager`` indexes only its own tasks plus ``include_path``, and the
``LMMS_EVAL_PLUGINS`` variable extends the path after the task index is built (so it does not
work). Either pass the path::

    python -m lmms_eval --model llava_sd \\
        --model_args pretrained=<target>,draft=<draft>,tree=chain,tree.k=4,baseline=true \\
        --tasks shapes --output_path results \\
        --include_path "$(python -c 'import lmms_sd.lmms_eval as m; print(m.tasks_dir())')"

(in a source checkout the link ``tasks`` does as well), or call ``eval_main``
(``python -c 'import lmms_sd.lmms_eval as m; raise SystemExit(m.eval_main())' --model ...``), which adds it.

Multi-process: ``accelerate launch --num_processes N -m lmms_eval ...`` (on CPU:
``ACCELERATE_USE_CPU=true python -m accelerate.commands.launch --multi_gpu ...``).

Outputs: accuracy in the usual results JSON; speed in its ``throughput`` section
(``avg_tau``, ``avg_speedup``, ``avg_<task>/tau``, ...; see ``speed.py``) and per sample in
``<output_path>/<model>/<date>_speed.jsonl`` beside the results. ``lmms-sd report OUT...``
(``lmms_sd.report``) turns several runs into one leaderboard.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def tasks_dir() -> Path:
    """The directory of the tasks shipped with lmms_sd (for lmms-eval's ``--include_path``)."""
    return Path(__file__).resolve().parent.parent / "tasks"


def eval_main(argv: list[str] | None = None) -> int:
    """lmms-eval's command line with ``tasks_dir()`` added to ``--include_path``; returns the
    exit status (also what ``lmms-sd eval`` exits with).

    lmms-eval 0.7.3's own CLI exits 0 on many errors (a task that is not found, a model that
    fails to load): ``cli_evaluate`` catches the exception of each evaluation, prints it and
    goes on. Here an exception in any evaluation, or (on rank 0, with ``--output_path``) no new
    ``*_results.json`` under the output path, makes the status 1."""
    import lmms_eval.__main__ as harness

    argv = sys.argv[1:] if argv is None else argv
    sys.argv = ["lmms-eval", *argv]
    _, args = harness.parse_eval_args()
    args.include_path = [p for p in (args.include_path, str(tasks_dir())) if p]
    failures: list[BaseException] = []
    evaluate_one = harness.cli_evaluate_single

    def recording(one_args):  # the function cli_evaluate calls per evaluation, errors noted
        try:
            return evaluate_one(one_args)
        except Exception as e:
            failures.append(e)
            raise

    before = _results_files(args.output_path)
    harness.cli_evaluate_single = recording
    try:
        harness.cli_evaluate(args)
    finally:
        harness.cli_evaluate_single = evaluate_one
    if failures:
        print(f"lmms-sd eval: the evaluation failed: {type(failures[0]).__name__}: "
              f"{failures[0]}", file=sys.stderr)
        return 1
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if args.output_path and rank0 and not _results_files(args.output_path) - before:
        print(f"lmms-sd eval: lmms-eval wrote no results file under {args.output_path}",
              file=sys.stderr)
        return 1
    return 0


def _results_files(output_path: str | None) -> set[Path]:
    if not output_path or not Path(output_path).exists():
        return set()
    return set(Path(output_path).rglob("*_results.json"))

"""The offline demo: an lmms-eval run of a speculative model class on the shipped shapes models.

    python -m lmms_sd.demo                      # llava_msd on shapes_caption (48 documents)
    python -m lmms_sd.demo --model llava_sd --limit 16 --tasks shapes
    python -m lmms_sd.demo --model-args tree=dynamic   # MSD's published tree (depth 5, top-k 10, 59 nodes)
    python -m lmms_sd.demo --model llava_msd_calibrated  # the head under the shipped calibrator
    python -m lmms_sd.demo --compare            # every shipped drafter, then their leaderboard

It launches the real harness (``accelerate launch -m lmms_eval`` through
``python -m accelerate.commands.launch``, which works without torchvision), with
``baseline=true`` so the same process also decodes every request autoregressively, then reads
the results JSON and prints accuracy and speed side by side.

``--compare`` runs the shipped drafters of one family (``COMPARE``) one after another in a
single lmms-eval process (its ``--config`` file lists the runs), each into its own folder under
``--out/<time>/``, and prints ``lmms-sd report`` of them (written to ``--out/<time>/report``).

The demo's tree is ``tree=auto``: at start-up the model class times the target's forwards of
1..64 tokens and the drafter's calls, measures the acceptance of the first request on a probe
tree, and picks the tree kind and size with the most expected tokens per second
(``lmms_sd/trees/auto.py``; the choice is logged and lands in the results' throughput section
and the per-sample JSONL). ``--model-args`` replaces the demo's tree settings, e.g.
``tree=chain,tree.k=4``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from .lmms_eval import tasks_dir

DRAFT_ROLE = {"llava_msd": "msd_head", "qwen2_vl_msd": "msd_head", "llava_sd": "draft_vlm",
              "qwen2_vl_sd": "draft_vlm", "llava_msd_calibrated": "msd_head",
              "qwen2_vl_msd_calibrated": "msd_head"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


def family_of(model: str) -> str:
    return "qwen2_vl" if model.startswith("qwen2_vl") else "llava"


def default_model_args(model: str) -> str:
    """The planned tree (``tree=auto``); the calibrated classes (their tree is the calibrated OPT-Tree) take the
    shipped calibrator instead (offline mode: every request is measured)."""
    if model.endswith("_calibrated"):
        from .assets import shipped_calibrator

        return f"cal.calibrator={shipped_calibrator(family_of(model))}"
    return "tree=auto"


def command(model: str, tasks: str, limit: int | None, out: Path, processes: int,
            extra_args: str = "") -> list[str]:
    """The accelerate + lmms-eval command line of the demo."""
    from .assets import shipped_model

    family = family_of(model)
    if model not in DRAFT_ROLE:
        raise ValueError(f"the demo runs one of {sorted(DRAFT_ROLE)}, not {model!r}")
    args = (f"pretrained={shipped_model(family, 'target')},"
            f"draft={shipped_model(family, DRAFT_ROLE[model])},baseline=true")
    if extra_args:
        args += "," + extra_args
    cmd = launcher(processes) + ["-m", "lmms_eval", "--model", model, "--model_args", args,
                    "--tasks", tasks, "--include_path", str(tasks_dir()),
                    "--batch_size", "1", "--output_path", str(out), "--verbosity", "WARNING"]
    return cmd + (["--limit", str(limit)] if limit else [])


# The shipped drafters side by side: (folder, model, model_args beyond pretrained and baseline);
# {role} is a shipped model of the family, {calibrator} its MSD head's calibrator. The cascade's
# k_matrix and lenience are the best of ``python -m lmms_sd.bench.cascade --sweep`` (README).
COMPARE = (
    ("draft_vlm", "sd", "draft={draft_vlm},tree=chain,tree.k=4"),
    ("text_only", "sd", "draft={text_only},tree=chain,tree.k=4"),
    ("msd_head", "msd", "draft={msd_head},tree=chain,tree.k=4"),
    ("cascade", "cascade", "drafts={draft_vlm};{text_only};mag,k_matrix=4 1 1;0 4 2;0 0 2,"
                           "lenience=2"),
    ("calibrated", "msd_calibrated", "draft={msd_head},cal.calibrator={calibrator}"),
)
COMPARE_LIMIT = 16


def compare_config(family: str, tasks: str, limit: int | None, out: Path) -> list[dict]:
    """lmms-eval ``--config`` entries: one run per ``COMPARE`` drafter, each into ``out/<name>``."""
    from .assets import shipped_calibrator, shipped_model

    paths = {role: shipped_model(family, role) for role in ("draft_vlm", "text_only", "msd_head")}
    runs = []
    for name, method, extra in COMPARE:
        args = (f"pretrained={shipped_model(family, 'target')},baseline=true,"
                + extra.format(**paths, calibrator=shipped_calibrator(family)))
        runs.append({"model": f"{family}_{method}", "model_args": args, "tasks": tasks,
                     "include_path": str(tasks_dir()), "batch_size": "1",
                     "output_path": str(out / name), "verbosity": "WARNING",
                     **({"limit": limit} if limit else {})})
    return runs


def compare(family: str, tasks: str, limit: int | None, out: Path, processes: int,
            env: dict[str, str]) -> int:
    """Run every ``COMPARE`` drafter in one lmms-eval process and print their leaderboard."""
    import yaml

    from .report import main as report

    out.mkdir(parents=True, exist_ok=True)
    config = out / "compare.yaml"
    config.write_text(yaml.safe_dump(compare_config(family, tasks, limit, out)))
    cmd = launcher(processes) + ["-m", "lmms_eval", "--config", str(config),
                                 "--verbosity", "WARNING"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)
    print(f"\nthe shipped {family} drafters on {tasks} ({limit or 'all'} documents), each against "
          f"autoregressive decoding of the same requests in the same process:\n", flush=True)
    return report([str(out / name) for name, _, _ in COMPARE] + ["--out", str(out / "report")])


def launcher(processes: int) -> list[str]:
    """``accelerate launch`` without its console script (which needs torchvision)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes",
              str(processes), "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    return launch + (["--multi_gpu"] if processes > 1 else [])


def newest_results(out: Path) -> dict:
    files = sorted(out.rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"lmms-eval wrote no results under {out}: see its log above")
    return json.loads(files[-1].read_text())


def summary_table(results: dict) -> str:
    """Accuracy per task and the speed summary of a results JSON, as Markdown."""
    rows = ["| task | content_acc | tau | tokens/s | AR tokens/s | speedup | greedy mismatches |",
            "|---|---|---|---|---|---|---|"]
    speed = results.get("throughput", {})

    def get(task: str, key: str) -> str:
        if not task and key == "tokens_per_second":
            key = "speed"  # lmms-eval's own name for the overall tokens/s
        v = speed.get(f"avg_{task}/{key}" if task else f"avg_{key}")
        return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    for task, metrics in results.get("results", {}).items():
        acc = next((v for k, v in metrics.items() if k.startswith("content_acc") and "stderr" not in k), None)
        acc_s = "-" if acc is None else f"{acc:.3f}"
        rows.append(f"| {task} | {acc_s} | {get(task, 'tau')} | {get(task, 'tokens_per_second')} | "
                    f"{get(task, 'baseline_tokens_per_second')} | {get(task, 'speedup')} | "
                    f"{get(task, 'mismatches')} |")
    rows.append(f"| all | - | {get('', 'tau')} | {get('', 'tokens_per_second')} | "
                f"{get('', 'baseline_tokens_per_second')} | {get('', 'speedup')} | {get('', 'mismatches')} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmms_sd.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llava_msd", choices=sorted(DRAFT_ROLE))
    ap.add_argument("--tasks", default="shapes_caption")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (0: all; "
                    f"default: all, {COMPARE_LIMIT} with --compare)")
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--model-args", default=None, help="extra model_args (default: "
                    "tree=auto; cal.calibrator=<shipped> for the calibrated classes)")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--compare", action="store_true", help="run every shipped drafter of "
                    "--family (COMPARE) and print their leaderboard; ignores --model, --model-args")
    ap.add_argument("--family", default="llava", choices=("llava", "qwen2_vl"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    env = {**os.environ, **OFFLINE}
    if args.processes > 1:
        env.setdefault("ACCELERATE_USE_CPU", "true")
    if args.compare:
        limit = COMPARE_LIMIT if args.limit is None else args.limit or None
        return compare(args.family, args.tasks, limit, out / time.strftime("%Y%m%d_%H%M%S"),
                       args.processes, env)
    if args.model_args is None:
        args.model_args = default_model_args(args.model)
    cmd = command(args.model, args.tasks, args.limit or None, out, args.processes, args.model_args)
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)
    results = newest_results(out)
    speed = results.get("throughput", {})
    print(f"\n{args.model} ({args.model_args}) on {args.tasks} ({args.limit or 'all'} documents); "
          "accuracy and speed from the same run, the speedup against autoregressive decoding of "
          f"the same requests in the same process; {platform.processor() or platform.machine()}, "
          f"{speed.get('avg_threads', 0):.0f} torch threads x {speed.get('avg_world_size', 0):.0f} "
          "processes:\n")
    print(summary_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``lmms-sd``: the package's command line.

    lmms-sd demo [...]        the offline demo evaluation (python -m lmms_sd.demo)
    lmms-sd eval [...]        lmms-eval's CLI with lmms_sd's tasks on --include_path
    lmms-sd tasks-dir         print the directory of the shipped lmms-eval tasks
    lmms-sd bench [...]       the speed benchmark (python -m lmms_sd.bench.run)
    lmms-sd generate [...]    one answer about your own images, with its statistics
                              (lmms_sd.cli_generate; --help for its options)
    lmms-sd report RUN_DIR... --out DIR   a leaderboard (Markdown, CSV, pictures) of lmms-eval runs
"""
from __future__ import annotations

import sys
from typing import Sequence

COMMANDS = ("demo", "eval", "tasks-dir", "bench", "generate", "report")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "demo":
        from .demo import main as demo

        return demo(rest)
    if command == "eval":
        from .lmms_eval import eval_main

        return eval_main(rest)
    if command == "tasks-dir":
        from .lmms_eval import tasks_dir

        print(tasks_dir())
        return 0
    if command == "bench":
        from .bench.run import main as bench

        bench(rest)
        return 0
    if command == "generate":
        from .cli_generate import main as generate

        return generate(rest)
    if command == "report":
        from .report import main as report

        return report(rest)
    print(f"lmms-sd: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

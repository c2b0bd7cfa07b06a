"""Mutation check of the decoding core: named one-line bugs of the real source must fail tests.

``python -m lmms_sd.testing.mutants`` copies the package and the tests of a repository checkout
into a temporary directory, edits one line of the copy per mutant (the text to replace must
occur exactly once in the real file), and runs that mutant's tests against the copy (its own
``python -m pytest``, the copy first on ``sys.path``). A mutant is *caught* when pytest reports
failing tests (exit status 1); a collection or usage error (any other status) is reported as
broken, never as caught. First, the unmutated copy must pass the union of the selected tests
(``--no-control`` skips that). ``--fast`` runs the mutants a CI test runs; ``--only a,b`` picks
by name; ``--list`` prints them. ``LMMS_SD_STAT_DRAWS`` reaches the statistical tests, and the
script sets ``LMMS_SD_STAT_FULL=1`` (their heavy variant: more regimes). ``--power REGIME``
estimates the statistical tests' power against one mutant.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STATS = "tests/test_sampling_generate.py"
TREES = "tests/test_lossless.py::test_scripted_trees_accept_later_siblings"
HEAVY_DRAWS = "2000"  # draws per statistical regime here, unless LMMS_SD_STAT_DRAWS says


@dataclass(frozen=True)
class Mutant:
    """``old`` -> ``new`` in ``lmms_sd/<path>``; ``tests``: pytest arguments that must fail."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    fast: bool = False


def _stats(*ids: str) -> tuple[str, ...]:
    return tuple(f"{STATS}::test_generate_samples_the_target_distribution[{i}]" for i in ids)


MUTANTS = [
    Mutant("target_ignores_sampling", "core/generate.py",  # the first mutant
           "verify_stochastic(tree, logits_to_probs(res.logits, cfg.sampling), gen)",
           "verify_stochastic(tree, logits_to_probs(res.logits, SamplingConfig()), gen)",
           _stats("llava-msd-chain"), fast=True),
    Mutant("shared_sibling_coin", "core/verify.py",  # the second: one coin per slot
           "r = float(torch.rand((), generator=generator, dtype=torch.float64))",  # (Sequoia)
           "r = r if q is not None and child != tree.children[slot][0] else float(torch.rand("
           "(), generator=generator, dtype=torch.float64))",
           _stats("llava-draft_vlm-sampled_tree", "qwen2_vl-draft_vlm-sampled_tree")),
    Mutant("shared_sibling_coin_point_mass", "core/verify.py",  # the same in the EAGLE rule
           "r = float(torch.rand((), generator=generator, dtype=torch.float64))",
           "r = r if q is None and child != tree.children[slot][0] else float(torch.rand("
           "(), generator=generator, dtype=torch.float64))",
           _stats("qwen2_vl-msd-topk_tree"), fast=True),
    Mutant("residual_dropped", "core/verify.py",
           "p = residual(p, q)", "p = p",
           _stats("llava-msd-chain")),
    Mutant("bonus_from_residual", "core/verify.py",  # bonus after a sampled leaf from relu(p - q)
           "return Verdict(accepted, sample(p.float(), generator))",
           "return Verdict(accepted, sample((residual(p, tree.draft_probs[int(tree.parents["
           "accepted[-1]]) + 1].double()) if tree.sampled and accepted and not "
           "tree.children[slot] else p).float(), generator))",
           _stats("llava-msd-chain", "qwen2_vl-draft_vlm-chain")),
    Mutant("q_not_renormalised", "core/verify.py",
           "q = q / qs if qs > 0 else q", "q = q",
           _stats("llava-draft_vlm-sampled_tree", "qwen2_vl-draft_vlm-sampled_tree")),
    Mutant("point_mass_not_renormalised", "core/verify.py",  # EAGLE rule after a rejection
           "p = p / p.sum()", "p = p",
           _stats("qwen2_vl-msd-topk_tree", "llava-draft_vlm-topk_tree")),
    Mutant("top_p_drops_the_crossing_token", "core/sampling.py",
           "drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= cfg.top_p",
           "drop_sorted = sorted_p.cumsum(-1) > cfg.top_p",
           _stats("llava-msd-chain")),
    Mutant("kv_keep_off_by_one", "core/kv.py",  # gathers the entry before each kept one
           "idx = start + indices.to(layer.keys.device)",
           "idx = start - 1 + indices.to(layer.keys.device)",
           (TREES,), fast=True),
    Mutant("chain_crop_off_by_one", "core/generate.py",
           "target.crop(start + n_kept)", "target.crop(start + n_kept - 1)",
           ("tests/test_lossless.py::test_scripted_drafter_exercises_partial_acceptance",)),
    Mutant("tree_mask_parent_only", "core/tree.py",  # a node sees its parent, not grandparents
           "m[i] = m[p]", "m[i, p] = True",
           (TREES, "tests/test_adapters.py::test_tree_forward_matches_each_path_as_a_chain")),
    Mutant("tree_positions_off_by_one", "core/generate.py",
           "res = target.forward(slots, start + tree.slot_depths().to(device),",
           "res = target.forward(slots, start + 1 + tree.slot_depths().to(device),",
           (TREES,)),
    Mutant("greedy_ignores_later_siblings", "core/verify.py",  # lossless, but slow
           "nxt = next((c for c in tree.children[slot] if tokens[c] == want), None)",
           "nxt = next((c for c in tree.children[slot][:1] if tokens[c] == want), None)",
           ("tests/test_verify.py", TREES)),
    Mutant("stats_not_trimmed_at_the_cut", "core/generate.py",
           "_trim_last_step(stats, len(new) - (len(out) - cut))", "pass",
           ("tests/test_lossless.py::test_eos_inside_an_accepted_block",)),
]


def copy_checkout(repo: Path, dest: Path) -> None:
    """The package (assets linked, not copied), the tests and pytest.ini of ``repo``."""
    ignore = shutil.ignore_patterns("__pycache__", "assets")
    shutil.copytree(repo / "lmms_sd", dest / "lmms_sd", ignore=ignore)
    (dest / "lmms_sd" / "assets").symlink_to(repo / "lmms_sd" / "assets")
    shutil.copytree(repo / "tests", dest / "tests", ignore=ignore)
    shutil.copy(repo / "pytest.ini", dest / "pytest.ini")


def apply(mutant: Mutant, root: Path) -> None:
    """Edit ``root/lmms_sd/<path>``: the one occurrence of ``old`` becomes ``new``."""
    path = root / "lmms_sd" / mutant.path
    text = path.read_text()
    if text.count(mutant.old) != 1:
        raise ValueError(f"mutant {mutant.name}: {mutant.old!r} occurs {text.count(mutant.old)} "
                         f"times in lmms_sd/{mutant.path}, expected once")
    path.write_text(text.replace(mutant.old, mutant.new))


def run_tests(root: Path, tests: tuple[str, ...], timeout: float,
              env: dict[str, str] | None = None) -> tuple[int, str]:
    """pytest over ``tests`` inside ``root`` (``env`` added to the environment): (exit
    status, last lines of output)."""
    env = {"LMMS_SD_STAT_DRAWS": HEAVY_DRAWS, **os.environ, "LMMS_SD_STAT_FULL": "1",
           **(env or {}), "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, "\n".join(proc.stdout.splitlines()[-5:])


@dataclass(frozen=True)
class Outcome:
    name: str
    status: int
    seconds: float
    tail: str

    @property
    def verdict(self) -> str:
        return {0: "SURVIVED", 1: "caught"}.get(self.status, f"broken (pytest status {self.status})")


def check(mutant: Mutant | None, tests: tuple[str, ...], repo: Path = REPO,
          timeout: float = 900, env: dict[str, str] | None = None) -> Outcome:
    """Run ``tests`` on a fresh copy of ``repo`` with ``mutant`` applied (None: unmutated)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmms_sd_mutant_") as tmp:
        root = Path(tmp)
        copy_checkout(repo, root)
        if mutant is not None:
            apply(mutant, root)
        status, tail = run_tests(root, tests, timeout, env)
    return Outcome(mutant.name if mutant else "control", status, time.perf_counter() - t0, tail)


def power(mutant: Mutant, regime: str, draws: int, repo: Path = REPO) -> None:
    """Print the statistical tests' power against ``mutant`` in ``regime`` (e.g.
    "llava-msd-sampled_tree"), estimated from ``draws`` draws of the mutated copy
    (``test_sampling_generate.power_report``)."""
    with tempfile.TemporaryDirectory(prefix="lmms_sd_mutant_") as tmp:
        root = Path(tmp)
        copy_checkout(repo, root)
        apply(mutant, root)
        code = ("import sys; sys.path.insert(0, 'tests'); import torch; torch.set_num_threads(1); "
                f"from test_sampling_generate import power_report; power_report({regime!r}, {draws})")
        env = {**os.environ, "PYTHONPATH": str(root)}
        subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmms_sd.testing.mutants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="only the mutants CI runs")
    ap.add_argument("--only", default="", help="comma-separated mutant names")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--no-control", action="store_true", help="skip the unmutated run")
    ap.add_argument("--repo", type=Path, default=REPO, help="checkout to mutate (default: this one)")
    ap.add_argument("--power", default="", metavar="REGIME",
                    help="with --only NAME: print the power of the statistical tests of REGIME "
                         "(e.g. llava-msd-sampled_tree) against that mutant")
    ap.add_argument("--draws", type=int, default=6000, help="draws of the mutant for --power")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if (not args.fast or m.fast)]
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {m.name for m in MUTANTS})
        if unknown:
            ap.error(f"unknown mutants {unknown}; --list shows them")
        chosen = [m for m in MUTANTS if m.name in names]
    if args.power:
        if len(chosen) != 1:
            ap.error("--power needs exactly one mutant (--only NAME)")
        power(chosen[0], args.power, args.draws, args.repo)
        return 0
    if args.list:
        for m in chosen:
            print(f"{m.name:34s} lmms_sd/{m.path:18s} {' '.join(m.tests)}")
        return 0
    t0 = time.perf_counter()
    if not args.no_control:
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        control = check(None, tests, args.repo)
        print(f"{'control (unmutated)':34s} {'passed' if control.status == 0 else 'FAILED'} "
              f"{control.seconds:6.1f} s", flush=True)
        if control.status != 0:
            print(control.tail)
            return 2
    outcomes = []
    for m in chosen:
        outcomes.append(check(m, m.tests, args.repo))
        o = outcomes[-1]
        print(f"{o.name:34s} {o.verdict:10s} {o.seconds:6.1f} s", flush=True)
        if o.status != 1:
            print(o.tail)
    missed = [o.name for o in outcomes if o.status != 1]
    print(f"{len(outcomes) - len(missed)}/{len(outcomes)} mutants caught in "
          f"{time.perf_counter() - t0:.0f} s" + (f"; not caught: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

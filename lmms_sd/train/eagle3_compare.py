"""The shipped EAGLE-3 head against the shipped MSD head on the same target, at equal trees.

    python -m lmms_sd.train.eagle3_compare --family llava --items 16 --threads 1

Rows: drafter (the MSD head; the EAGLE-3 head without and with modality decoupling) x tree
(a chain of 4, MSD's dynamic tree 5/10/59, EAGLE-3's 7/10/60), greedy decoding of held-out
shapes ``describe`` items (``msd_compare.describe_items``), every output checked
token-identical to the target's greedy output (else it raises). Figures pooled over the items
as in ``msd_compare`` (tau = emitted tokens per target step); ``seconds`` is the wall time of
all items of the row and ``speedup`` the plain greedy decode's time over it (one process,
``--threads`` torch threads, on a shared machine: indicative only). Writes
``lmms_sd/assets/shapes/<family>/eagle3_head/compare.json`` (``--out``) and, with ``--card``, the
card; ``--head`` compares another EAGLE-3 head (e.g. one trained with ``--decouple-images``).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapters.loading import load_adapter
from ..assets import SHAPES_DIR, shipped_model
from ..drafters.eagle3 import Eagle3Config, bind_target_states, load_eagle3_drafter
from ..drafters.msd import load_msd_drafter
from .evaluate import MAX_NEW_TOKENS, greedy_outputs
from .msd_compare import EVAL_SEED, describe_items, measure

HEAD_DIR = "eagle3_head"
TREES: dict[str, tuple[str, dict[str, int]]] = {
    "chain_4": ("chain", {"k": 4}),
    "dynamic_59": ("dynamic", {"depth": 5, "top_k": 10, "total_tokens": 59}),
    "eagle3_60": ("dynamic", {"depth": 7, "top_k": 10, "total_tokens": 60}),
}


def compare(family: str, n_items: int, folder: str) -> dict[str, Any]:
    """Every (drafter, tree) row; ``folder``: the EAGLE-3 head."""
    target = load_adapter(shipped_model(family, "target"))
    items = describe_items(n_items)
    t0 = time.perf_counter()
    reference = greedy_outputs(target, items)
    greedy_seconds = time.perf_counter() - t0
    drafters = {"msd_head": load_msd_drafter(str(shipped_model(family, "msd_head")), target.model)}
    for decouple in (False, True):
        name = "eagle3_head" + ("_decoupled" if decouple else "")
        drafters[name] = load_eagle3_drafter(folder, target.model,
                                             cfg=Eagle3Config(decouple_images=decouple))
    rows = []
    for role, drafter in drafters.items():
        target.hidden_layers = None  # the MSD head reads the last layer's features
        if role.startswith("eagle3"):
            bind_target_states(target, drafter.head)
        for name, (tree, settings) in TREES.items():
            t0 = time.perf_counter()
            row = measure(target, drafter, tree, settings, items, reference)
            seconds = time.perf_counter() - t0
            rows.append({"drafter": role, "tree": name, **settings, **row, "seconds": seconds,
                         "speedup": greedy_seconds / seconds})
            print(f"{role:22s} {name:10s} tau {row['tau']:.2f} acc {row['acceptance_rate']:.3f} "
                  f"speedup {greedy_seconds / seconds:.2f}", flush=True)
    return {"family": family, "rows": rows, "greedy_seconds": greedy_seconds,
            "eval_items": f"describe_items({n_items}, seed={EVAL_SEED}): held-out test-split "
                          f"shapes describe items, greedy, max_new_tokens {MAX_NEW_TOKENS}",
            "dtype": "float32", "device": "cpu"}


def write_card(metrics: dict[str, Any], path: Path) -> Path:
    train = metrics.get("train") or {}
    lines = [f"# shapes {metrics['family']} EAGLE-3 head",
             "", "An EAGLE-3 draft head (fc 3H->H over target layers "
             f"{train.get('aux_layers')}, one 2H-input decoder layer, its own norm and lm_head "
             f"over a {train.get('draft_vocab', {}).get('size')}-token draft vocabulary) for "
             "the shipped shapes LLaVA target, in the published EAGLE-3 layout "
             f"(`lmms_sd/assets/shapes/{metrics['family']}/{HEAD_DIR}`).", "",
             "## Training", "", f"`{train.get('command')}`", "",
             f"{train.get('optim', {}).get('steps')} steps, batch "
             f"{train.get('optim', {}).get('batch_size')}, training-time test over "
             f"{train.get('eagle3', {}).get('ttt_steps')} steps, "
             f"{train.get('train_seconds', 0):.0f} s on CPU, {train.get('threads')} torch "
             f"thread(s), float32; curriculum {train.get('curriculum')}.", "",
             "## Compared with the shipped MSD head", "", f"`{metrics['command']}` "
             f"({metrics['eval_items']}; {metrics['dtype']}, {metrics['device']}, "
             f"{metrics['environment']['threads']} thread(s); every output lossless)", "",
             "| drafter | tree | tau | acceptance | draft forwards / step | speedup |",
             "|---|---|---|---|---|---|"]
    for r in metrics["rows"]:
        lines.append(f"| {r['drafter']} | {r['tree']} | {r['tau']:.2f} | "
                     f"{r['acceptance_rate']:.3f} | {r['draft_forwards']:.1f} | "
                     f"{r['speedup']:.2f} |")
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lmms_sd.train.eagle3_compare",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="llava", choices=("llava", "qwen2_vl"))
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--card", type=Path, default=None, help="write the model card here")
    ap.add_argument("--head", type=Path, help="the EAGLE-3 head (default: the shipped one)")
    ap.add_argument("--out", type=Path, help="the metrics file (default: compare.json beside "
                    "the shipped head)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = args.head or SHAPES_DIR / args.family / HEAD_DIR
    metrics = compare(args.family, args.items, str(folder))
    record = folder / "train_record.json"
    metrics["train"] = json.loads(record.read_text()) if record.is_file() else None
    if metrics["train"] is not None:
        metrics["train"]["aux_layers"] = json.loads((folder / "config.json").read_text())[
            "eagle_config"]["eagle_aux_hidden_state_layer_ids"]
        metrics["train"].pop("loss_history", None)
    metrics["command"] = "python -m lmms_sd.train.eagle3_compare " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    metrics["environment"] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    out = args.out or SHAPES_DIR / args.family / HEAD_DIR / "compare.json"
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    if args.card is not None:
        print(write_card(metrics, args.card))


if __name__ == "__main__":
    main()

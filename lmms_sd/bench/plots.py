"""Pictures of where accepted tokens come from, drawn from per-sample speed records.

    python -m lmms_sd.bench.plots --records vlm=a.jsonl text=b.jsonl --tokenizer PATH --out DIR

Input: JSONL records as the lmms-eval layer writes them (``lmms_eval/speed.py``; each has
``stats`` with ``tokens``, ``origin`` ("d"/"t" per token), ``accepted_per_step`` and
``tree_size_per_step``) or as ``studies.collect_records`` writes them (the same plus ``method``).
A record's label is the ``LABEL=`` given with its file, else its ``method``, else the file name.
Writes:

  trajectories.png             (a) each sample's decoded text, token by token, coloured by origin
                               (draft: accepted draft token; target: the target's own token)
  acceptance_by_category.png   (b) acceptance rate per token category (``token_category`` of the
                               target's token) and overall, one bar per label
  accept_length_hist.png       (c) accepted draft tokens per step, share of steps, per label
  plots.json                   the numbers behind (b) and (c)

Acceptance rate here = accepted / offered over emitted positions where the target judged a draft
token: an accepted draft ("d"), or a target token that replaced a rejected draft. A target token
after a fully accepted chain (the bonus) was not offered a draft and is left out. The step's
depth decides which is which: ``tree_depth_per_step`` when a record has it, else the tree size,
which is the depth for chains; for trees, a step accepted down to a leaf shallower than the tree
size then counts its bonus token as a rejection.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..calibration.features import CATEGORIES, token_category

Record = dict[str, Any]
Decode = Callable[[int], str]  # one token id -> its text
COLOURS = {"d": "#9ecae1", "t": "#fdae6b"}  # draft blue, target orange
ORIGIN_NAMES = {"d": "draft (accepted)", "t": "target"}


# ---------------------------------------------------------------------------- records

def load_records(specs: Sequence[str]) -> list[Record]:
    """Records of every ``[LABEL=]FILE.jsonl``, each with its ``label`` set."""
    records = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        file = Path(path if sep else spec)
        label = label if sep else ""
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "stats" not in record or "tokens" not in record["stats"]:
                raise ValueError(f"{file}:{n}: a record needs stats.tokens (and stats.origin)")
            record["label"] = label or record.get("method") or file.stem
            records.append(record)
    return records


def offered_positions(stats: dict) -> Iterator[tuple[int, bool]]:
    """(index into ``stats["tokens"]``, accepted) for every emitted position that was offered a
    draft token (see the module docstring). Checks the steps against ``origin``."""
    tokens, origin = stats["tokens"], stats["origin"]
    if len(origin) != len(tokens):
        raise ValueError(f"origin has {len(origin)} entries for {len(tokens)} tokens")
    depths = stats.get("tree_depth_per_step") or stats["tree_size_per_step"]
    pos = 1  # the first token comes from the prefill
    for accepted, depth in zip(stats["accepted_per_step"], depths):
        if pos >= len(tokens):
            break
        block = origin[pos: pos + accepted + 1]
        drafts = len(block) - len(block.lstrip("d"))  # accepted drafts emitted by the step
        last = pos + len(block) >= len(tokens)  # a cut step may end on an accepted draft
        if block != ("d" * accepted + "t")[: len(block)] and not (last and drafts == len(block)):
            raise ValueError(f"origin {block!r} at token {pos} contradicts {accepted} accepted")
        yield from ((pos + j, True) for j in range(drafts))
        if depth > accepted and drafts == accepted < len(block):
            yield pos + accepted, False
        pos += accepted + 1


def acceptance_table(records: Sequence[Record], decode: Decode) -> dict[str, dict[str, list[int]]]:
    """``{label: {category or "all": [accepted, offered]}}``, categories of the emitted token."""
    table: dict[str, dict[str, list[int]]] = defaultdict(
        lambda: {c: [0, 0] for c in (*CATEGORIES, "all")})
    for r in records:
        tokens = r["stats"]["tokens"]
        for i, ok in offered_positions(r["stats"]):
            for key in (token_category(decode(tokens[i])), "all"):
                table[r["label"]][key][0] += ok
                table[r["label"]][key][1] += 1
    return dict(table)


def accepted_lengths(records: Sequence[Record]) -> dict[str, Counter]:
    """``{label: Counter(accepted per step)}`` over steps that drafted anything."""
    out: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        st = r["stats"]
        out[r["label"]].update(a for a, size in zip(st["accepted_per_step"],
                                                    st["tree_size_per_step"]) if size > 0)
    return {k: v for k, v in out.items() if v}


# ---------------------------------------------------------------------------- (a) trajectories

def _piece(text: str) -> str:
    """A token's text for one grid cell per character: newline and tab as arrows, other
    unprintable characters as ``\\xNN``."""
    text = text.replace("\n", "\u21b5").replace("\t", "\u2192")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _layout(pieces: list[str], width: int) -> list[tuple[int, int, str]]:
    """(line, column, piece) of each piece, wrapped at ``width`` characters."""
    out, line, col = [], 0, 0
    for p in pieces:
        p = p[:width] or " "
        if col + len(p) > width and col > 0:
            line, col = line + 1, 0
        out.append((line, col, p))
        col += len(p)
    return out


def plot_trajectories(path: str | Path, records: Sequence[Record], decode: Decode,
                      max_samples: int = 8, width: int = 100, fontsize: float = 8.0) -> Path:
    """(a) One block per sample: its decoded tokens on a character grid, coloured by origin.
    Samples are ordered by (task, doc_id, label), so the labels of one prompt sit together."""
    ordered = sorted(records, key=lambda r: (r.get("task", ""), r.get("doc_id", 0), r["label"]))
    samples = [(r, _layout([_piece(decode(t)) for t in r["stats"]["tokens"]], width))
               for r in ordered[:max_samples]]
    if not samples:
        raise ValueError("no records to draw")
    char_w, line_h = 0.6021 * fontsize / 72, 1.9 * fontsize / 72  # inches, DejaVu Sans Mono
    lines = sum(1 + (lay[-1][0] + 1 if lay else 0) + 0.6 for _, lay in samples)
    pad = 0.25
    fig = Figure(figsize=(width * char_w + 2 * pad, (lines + 2) * line_h + 2 * pad))
    FigureCanvasAgg(fig)
    w, h = fig.get_size_inches()
    ax = fig.add_axes((pad / w, pad / h, width * char_w / w, (lines + 2) * line_h / h))
    ax.set(xlim=(0, width), ylim=(lines + 2, 0))
    ax.axis("off")
    ax.legend(handles=[Patch(color=COLOURS[o], label=ORIGIN_NAMES[o]) for o in "dt"],
              loc="upper left", ncol=2, fontsize=fontsize, frameon=False,
              bbox_to_anchor=(0, 1.0))
    y = 2.0
    for r, lay in samples:
        st = r["stats"]
        ax.text(0, y, f"{r['label']}  doc {r.get('doc_id', '?')}: {len(st['tokens'])} tokens, "
                      f"{st['origin'].count('d')} drafted, tau {st.get('tau', 0):.2f}",
                fontsize=fontsize, fontweight="bold", va="center", family="monospace")
        for (line, col, piece), origin in zip(lay, st["origin"]):
            ax.text(col, y + 1 + line, piece, fontsize=fontsize, family="monospace", va="center",
                    bbox={"boxstyle": "square,pad=0.12", "fc": COLOURS[origin], "ec": "white",
                          "lw": 0.6})
        y += 1 + (lay[-1][0] + 1 if lay else 0) + 0.6
    path = Path(path)
    fig.savefig(path, dpi=130)
    return path


# ---------------------------------------------------------------------------- (b), (c) bars

def plot_acceptance_by_category(path: str | Path,
                                table: dict[str, dict[str, list[int]]]) -> Path:
    """(b) Grouped bars: acceptance rate per category and overall, one bar per label."""
    if not table:
        raise ValueError("no offered draft tokens to plot")
    groups = (*CATEGORIES, "all")
    labels = sorted(table)
    fig = Figure(figsize=(1.6 + 1.5 * len(groups) * max(1, len(labels) / 2), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x, bar = np.arange(len(groups)), 0.8 / len(labels)
    for i, label in enumerate(labels):
        acc = [table[label][g] for g in groups]
        rates = [a / n if n else 0.0 for a, n in acc]
        bars = ax.bar(x - 0.4 + bar * (i + 0.5), rates, bar, label=label)
        for b, (a, n) in zip(bars, acc):
            ax.annotate(f"n={n}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set(xticks=x, xticklabels=groups, ylim=(0, 1.1), ylabel="accepted / offered",
           title="Draft acceptance by category of the target's token")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    return Path(path)


def plot_accept_length_hist(path: str | Path, lengths: dict[str, Counter]) -> Path:
    """(c) Share of steps with each number of accepted draft tokens, one bar per label."""
    if not lengths:
        raise ValueError("no drafting steps to plot")
    labels = sorted(lengths)
    top = max(max(c) for c in lengths.values())
    x, bar = np.arange(top + 1), 0.8 / len(labels)
    fig = Figure(figsize=(max(5.0, 0.6 * (top + 1) * max(1, len(labels) / 2) + 1.5), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, label in enumerate(labels):
        c = lengths[label]
        steps = sum(c.values())
        mean = sum(a * n for a, n in c.items()) / steps
        ax.bar(x - 0.4 + bar * (i + 0.5), [c[a] / steps for a in x], bar,
               label=f"{label} ({steps} steps, tau {mean + 1:.2f})")
    ax.set(xticks=x, xlabel="accepted draft tokens in a step", ylabel="share of steps",
           title="Acceptance length per step")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    return Path(path)


# ---------------------------------------------------------------------------- all three

def token_decoder(tokenizer: Any) -> Decode:
    """One id -> its text, special tokens shown, cached per id."""
    cache: dict[int, str] = {}

    def decode(i: int) -> str:
        if i not in cache:
            cache[i] = tokenizer.decode([i], skip_special_tokens=False)
        return cache[i]
    return decode


def plot_all(records: Sequence[Record], decode: Decode, out: str | Path,
             max_samples: int = 8, width: int = 100) -> dict:
    """Write the three pictures and ``plots.json`` under ``out``; return the JSON's content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = acceptance_table(records, decode)
    lengths = accepted_lengths(records)
    plot_trajectories(out / "trajectories.png", records, decode, max_samples, width)
    plot_acceptance_by_category(out / "acceptance_by_category.png", table)
    plot_accept_length_hist(out / "accept_length_hist.png", lengths)
    summary = {"acceptance": {label: {g: {"accepted": a, "offered": n} for g, (a, n) in row.items()}
                              for label, row in table.items()},
               "accepted_lengths": {label: {str(k): v for k, v in sorted(c.items())}
                                    for label, c in lengths.items()}}
    (out / "plots.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m lmms_sd.bench.plots", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", nargs="+", required=True, metavar="[LABEL=]FILE.jsonl")
    ap.add_argument("--tokenizer", required=True, help="a model directory with its tokenizer")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-samples", type=int, default=8)
    ap.add_argument("--width", type=int, default=100, help="characters per line in (a)")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    decode = token_decoder(AutoTokenizer.from_pretrained(args.tokenizer))
    summary = plot_all(load_records(args.records), decode, args.out, args.max_samples, args.width)
    print(f"wrote {args.out}/trajectories.png, acceptance_by_category.png, "
          f"accept_length_hist.png, plots.json")
    return summary


if __name__ == "__main__":
    main()

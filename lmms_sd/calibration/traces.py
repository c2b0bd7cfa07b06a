"""Acceptance traces: one record per verified draft candidate, the calibrator's training data.

Which candidates have labels
----------------------------
The verify forward computes target logits for *every* slot of the tree (the root and each
node), not only along the accepted path. So every node y with parent slot s has its target
distribution p_s, and with it a label, whether or not its branch was accepted. The label is the
acceptance probability of y *given that its parent was accepted*: the conditional factor a tree
builder multiplies along a path. Labels of one node:

soft         min(1, p_s(y) / q_s(y)), the chance that speculative sampling accepts a single
             child y drawn from the draft distribution q_s.
hard         y == argmax p_s, acceptance under greedy verification.
target_prob  p_s(y), the chance that the deterministic-children rule (EAGLE-2) accepts y when it
             is tried first.

Cost of collecting traces
-------------------------
No extra target forward: ``records_from_tree`` reads rows the verify forward already computed.
What remains: decoding token texts for categories (once per tokenizer, ``category_table``, then
an index lookup); the draft's attention readout (the drafter must return attentions, which in
Hugging Face models means the eager attention path instead of SDPA, plus a [Q, S] x [S] product
for the image mass); a top-2 over each parent slot's draft row for the margin; moving O(N)
floats to the host; writing JSONL.

File format (JSONL): the first line is a header
``{"format": "lmms_sd.acceptance_traces", "version": 1, "tokenizer_fingerprint": "..."}``,
then one flat object per record with the keys of ``TraceRecord.to_json``.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ..core.tree import DraftTree
from .features import CATEGORIES, CandidateFeatures, FeatureArrays, draft_margin

TRACE_FORMAT = "lmms_sd.acceptance_traces"
TRACE_VERSION = 1
LABELS: tuple[str, ...] = ("soft", "hard", "target_prob")


@dataclass(frozen=True)
class TraceRecord:
    """One verified candidate: its token id, features and labels (see the module docstring)."""

    token: int
    features: CandidateFeatures
    soft: float
    hard: bool
    target_prob: float

    def to_json(self) -> dict:
        f = self.features
        return {"token": self.token, "confidence": f.confidence, "category": f.category,
                "attention": f.attention, "depth": f.depth, "margin": f.margin,
                "soft": self.soft, "hard": int(self.hard), "target_prob": self.target_prob}

    @staticmethod
    def from_json(obj: dict) -> TraceRecord:
        feats = CandidateFeatures(float(obj["confidence"]), str(obj["category"]),
                                  float(obj["attention"]), int(obj["depth"]),
                                  float(obj["margin"]))
        return TraceRecord(int(obj["token"]), feats, float(obj["soft"]), bool(obj["hard"]),
                           float(obj["target_prob"]))


@dataclass(frozen=True)
class TraceColumns:
    """Records as columns: features plus the three label columns, each # [n]."""

    features: FeatureArrays
    soft: np.ndarray
    hard: np.ndarray
    target_prob: np.ndarray

    def __len__(self) -> int:
        return len(self.soft)

    def label(self, kind: str) -> np.ndarray:  # [n] float64
        if kind not in LABELS:
            raise ValueError(f"unknown label {kind!r}; expected one of {LABELS}")
        return getattr(self, kind).astype(np.float64)

    @staticmethod
    def stack(records: Sequence[TraceRecord]) -> TraceColumns:
        return TraceColumns(
            features=FeatureArrays.stack([r.features for r in records]),
            soft=np.array([r.soft for r in records], dtype=np.float64),
            hard=np.array([r.hard for r in records], dtype=np.float64),
            target_prob=np.array([r.target_prob for r in records], dtype=np.float64),
        )


def records_from_tree(tree: DraftTree, target_probs: Tensor, draft_probs: Tensor,
                      categories: np.ndarray, attention: Tensor | None = None
                      ) -> list[TraceRecord]:
    """A record for every node of a verified tree, labelled from its parent slot's target row.

    target_probs: # [N+1, V] the verify forward's target distributions per slot, processed by
                  the same ``logits_to_probs`` as decoding (plain softmax when greedy)
    draft_probs:  # [N+1, V] the draft distribution per slot that the children were chosen from
    categories:   # [V] category id of each token id (``category_table``)
    attention:    # [N+1] draft attention mass on image positions per slot; None means 0
    """
    n = len(tree)
    if target_probs.shape[0] != n + 1 or draft_probs.shape[0] != n + 1:
        raise ValueError(f"need one row per slot ({n + 1}), got target {tuple(target_probs.shape)}"
                         f" and draft {tuple(draft_probs.shape)}")
    if attention is not None and attention.shape != (n + 1,):
        raise ValueError(f"attention must have shape ({n + 1},), got {tuple(attention.shape)}")
    if n == 0:
        return []
    if int(tree.tokens.max()) >= len(categories):
        raise ValueError(f"token id {int(tree.tokens.max())} is outside the category table of "
                         f"{len(categories)} entries (a table of another tokenizer?)")
    slot = (tree.parents + 1).to(target_probs.device)  # [N] parent slot of each node
    y = tree.tokens.to(target_probs.device)            # [N]
    conf = draft_probs.to(target_probs.device)[slot, y].double()
    if bool((conf <= 0).any()):
        bad = int(torch.nonzero(conf <= 0)[0])
        raise ValueError(f"node {bad} (token {int(y[bad])}) has draft probability 0 in its "
                         f"parent slot: it cannot have been drawn from draft_probs")
    p_y = target_probs[slot, y].double()
    soft = torch.clamp(p_y / conf, max=1.0)
    hard = target_probs.argmax(-1)[slot] == y
    margin = draft_margin(draft_probs)[slot.to(draft_probs.device)].double()
    attn = (attention.double()[slot.to(attention.device)] if attention is not None
            else torch.zeros(n, dtype=torch.float64))
    cols = [t.cpu().tolist() for t in (y, conf.clamp(0, 1), tree.depths, margin.clamp(0, 1),
                                        attn.clamp(0, 1), soft, hard, p_y)]
    cats = np.asarray(categories)[tree.tokens.cpu().numpy()]
    return [TraceRecord(tok, CandidateFeatures(c, CATEGORIES[int(cat)], a, d, m), s, h, p)
            for tok, c, d, m, a, s, h, p, cat in zip(*cols, cats)]


def write_traces(path: str | Path, records: Iterable[TraceRecord], tokenizer_fingerprint: str,
                 append: bool = False) -> None:
    """Write records as JSONL. ``append`` adds to an existing file after checking that its
    header names the same tokenizer fingerprint (a new file gets a header either way)."""
    path = Path(path)
    if append and path.exists() and path.stat().st_size > 0:
        found = read_header(path)
        if found != tokenizer_fingerprint:
            raise ValueError(f"{path} holds traces of tokenizer {found!r}, not "
                             f"{tokenizer_fingerprint!r}")
        mode, header = "a", None
    else:
        mode = "w"
        header = {"format": TRACE_FORMAT, "version": TRACE_VERSION,
                  "tokenizer_fingerprint": tokenizer_fingerprint}
    with path.open(mode) as fh:
        if header is not None:
            fh.write(json.dumps(header) + "\n")
        for r in records:
            fh.write(json.dumps(r.to_json()) + "\n")


def read_header(path: str | Path) -> str:
    """The tokenizer fingerprint in a trace file's header; errors on a foreign file."""
    with Path(path).open() as fh:
        first = fh.readline()
    header = json.loads(first) if first.strip() else {}
    if header.get("format") != TRACE_FORMAT or header.get("version") != TRACE_VERSION:
        raise ValueError(f"{path} is not a {TRACE_FORMAT} v{TRACE_VERSION} file (header "
                         f"format={header.get('format')!r}, version={header.get('version')!r})")
    return str(header["tokenizer_fingerprint"])


def iter_traces(path: str | Path, progress: bool = False) -> Iterator[TraceRecord]:
    """Records of a trace file, after checking its header."""
    read_header(path)
    with Path(path).open() as fh:
        fh.readline()
        for line in tqdm(fh, desc=f"reading {Path(path).name}", unit=" rec", disable=not progress):
            if line.strip():
                yield TraceRecord.from_json(json.loads(line))


def read_traces(paths: Sequence[str | Path], progress: bool = False
                ) -> tuple[str, list[TraceRecord]]:
    """The common tokenizer fingerprint and all records of one or more trace files."""
    if not paths:
        raise ValueError("no trace files given")
    prints = {str(p): read_header(p) for p in paths}
    if len(set(prints.values())) != 1:
        raise ValueError(f"trace files come from different tokenizers: {prints}")
    records = [r for p in paths for r in iter_traces(p, progress)]
    return next(iter(prints.values())), records

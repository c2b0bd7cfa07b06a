"""A bigram next-token table: the statistical fallback of MaG (``ngram.py``).

For every token ``a`` the table stores the token ``b`` that most often follows ``a`` in a corpus
(ties: the smallest id), or -1 where ``a`` was never followed by anything; ``fallback`` is the
most frequent token of the corpus (ties: the smallest id), proposed where the table has no entry.
CS Drafting ships such tables (``bigram_models/*.json``: a plain JSON list, entry ``a`` = the
greedy next token after ``a``); ``BigramTable.load`` reads that format too.

A table is only meaningful under the tokenizer it was counted with. Ours records that
tokenizer's fingerprint; ``check_vocab`` compares it with the target's, and for a published
list (no fingerprint) checks that its size lies between the tokenizer's base vocabulary and the
target's logit rows (a Llama table fits LLaVA's 32000 base ids, not Qwen2-VL's 151643).

Build one from a text corpus (one document per line; pairs never cross lines):

    python -m lmms_sd.drafters.bigram build --tokenizer PATH --corpus FILE --out table.json
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMAT = "lmms_sd-bigram-v1"


@dataclass(frozen=True)
class BigramTable:
    """next_token: # [V] long, the most frequent successor of each token, -1 for none.
    tokenizer_fingerprint: ``vocab_fingerprint`` of the tokenizer it was counted with (None for
    a published list)."""

    next_token: Tensor
    fallback: int
    tokenizer_fingerprint: str | None = None

    def __post_init__(self) -> None:
        v = len(self.next_token)
        if self.next_token.dim() != 1 or v == 0:
            raise ValueError("next_token must be a non-empty 1-D tensor, got shape "
                             f"{tuple(self.next_token.shape)}")
        if not 0 <= self.fallback < v:
            raise ValueError(f"fallback token {self.fallback} is outside the vocabulary [0, {v})")
        bad = (self.next_token < -1) | (self.next_token >= v)
        if bool(bad.any()):
            raise ValueError(f"next_token holds ids outside [-1, {v}): "
                             f"{self.next_token[bad][:5].tolist()}")

    @property
    def vocab_size(self) -> int:
        return len(self.next_token)

    def lookup(self, token: int) -> int:
        """The table's successor of ``token``; ``fallback`` where it has none (or the id is
        outside the table)."""
        if 0 <= token < self.vocab_size:
            nxt = int(self.next_token[token])
            if nxt >= 0:
                return nxt
        return self.fallback

    def check_vocab(self, tokenizer: "PreTrainedTokenizerBase", vocab_size: int) -> None:
        """Fail unless this table belongs to ``tokenizer`` (the target's, ``vocab_size`` logit
        rows); see the module docstring."""
        from ..calibration.calibrator import vocab_fingerprint  # deferred: sklearn

        fix = ("rebuild it with `python -m lmms_sd.drafters.bigram build --tokenizer "
               "<the target> ...`")
        if self.tokenizer_fingerprint is not None:
            ours = vocab_fingerprint(tokenizer.get_vocab())
            if self.tokenizer_fingerprint != ours:
                raise ValueError(f"bigram table was counted with another tokenizer "
                                 f"({self.tokenizer_fingerprint}, the target's is {ours}): {fix}")
            return
        base = int(getattr(tokenizer, "vocab_size", None) or len(tokenizer))
        if not base <= self.vocab_size <= vocab_size:
            raise ValueError(f"bigram table has {self.vocab_size} entries; the target's "
                             f"tokenizer has {base} base tokens and {vocab_size} logit rows, so "
                             f"the table belongs to another tokenizer: {fix}")

    # ------------------------------------------------------------------ building
    @staticmethod
    def from_token_ids(sequences: Iterable[Sequence[int]], vocab_size: int) -> "BigramTable":
        """Count the pairs of adjacent tokens within each sequence."""
        counter = PairCounter(vocab_size)
        for ids in sequences:
            counter.add(ids)
        return counter.table()

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> None:
        doc = {"format": FORMAT, "vocab_size": self.vocab_size, "fallback": self.fallback,
               "tokenizer_fingerprint": self.tokenizer_fingerprint,
               "next_token": self.next_token.tolist()}
        Path(path).write_text(json.dumps(doc), encoding="utf-8")

    @staticmethod
    def load(path: str | Path) -> "BigramTable":
        """Read our format, or CS Drafting's plain list (its ``fallback`` is then the most
        common entry of the list; the published files write 0 where they saw no successor, and
        those entries stay 0 as in the published code)."""
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        if isinstance(doc, list):
            nxt = torch.tensor(doc, dtype=torch.long)
            return BigramTable(nxt, Counter(doc).most_common(1)[0][0])
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"{path}: neither a {FORMAT} table nor a CS Drafting bigram list")
        nxt = torch.tensor(doc["next_token"], dtype=torch.long)
        if len(nxt) != doc["vocab_size"]:
            raise ValueError(f"{path}: vocab_size {doc['vocab_size']} != {len(nxt)} entries")
        return BigramTable(nxt, int(doc["fallback"]), doc.get("tokenizer_fingerprint"))


class PairCounter:
    """Counts unigrams and adjacent pairs in bounded memory: pair ``(a, b)`` is the code
    ``a * V + b``; codes are merged into (unique code, count) tensors every ``flush_every``."""

    def __init__(self, vocab_size: int, flush_every: int = 1 << 20):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size, self.flush_every = vocab_size, flush_every
        self._pending: list[Tensor] = []
        self._n_pending = 0
        self._codes = torch.zeros(0, dtype=torch.long)   # sorted unique pair codes
        self._counts = torch.zeros(0, dtype=torch.long)
        self._unigram = torch.zeros(vocab_size, dtype=torch.long)

    def add(self, ids: Sequence[int]) -> None:
        t = torch.as_tensor(list(ids), dtype=torch.long)
        if len(t) == 0:
            return
        if int(t.min()) < 0 or int(t.max()) >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got min {int(t.min())} "
                             f"max {int(t.max())}")
        self._unigram += torch.bincount(t, minlength=self.vocab_size)
        if len(t) > 1:
            self._pending.append(t[:-1] * self.vocab_size + t[1:])
            self._n_pending += len(t) - 1
        if self._n_pending >= self.flush_every:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        codes = torch.cat([self._codes, *self._pending])
        counts = torch.cat([self._counts, torch.ones(self._n_pending, dtype=torch.long)])
        self._codes, inverse = torch.unique(codes, return_inverse=True)
        self._counts = torch.zeros(len(self._codes), dtype=torch.long)
        self._counts.index_add_(0, inverse, counts)
        self._pending, self._n_pending = [], 0

    def table(self) -> BigramTable:
        self._flush()
        v = self.vocab_size
        first, second, counts = self._codes // v, self._codes % v, self._counts
        # order by (first asc, count desc, second asc); codes are already sorted by (first, second)
        order = torch.sort(-counts, stable=True).indices
        order = order[torch.sort(first[order], stable=True).indices]
        first, second = first[order], second[order]
        head = torch.ones(len(first), dtype=torch.bool)
        head[1:] = first[1:] != first[:-1]
        nxt = torch.full((v,), -1, dtype=torch.long)
        nxt[first[head]] = second[head]
        return BigramTable(nxt, int(self._unigram.argmax()))  # argmax: first of the ties


def build_from_corpus(tokenizer: "PreTrainedTokenizerBase", lines: Iterable[str],
                      vocab_size: int | None = None, progress: bool = True,
                      total: int | None = None) -> BigramTable:
    """Tokenize each non-empty line (no special tokens) and count its pairs.

    ``tokenizer``: a Hugging Face tokenizer; ``vocab_size`` defaults to ``len(tokenizer)``.
    """
    from tqdm import tqdm

    from ..calibration.calibrator import vocab_fingerprint  # deferred: sklearn

    counter = PairCounter(vocab_size or len(tokenizer))
    for line in tqdm(lines, total=total, disable=not progress, desc="bigram", unit="line"):
        line = line.rstrip("\n")
        if line.strip():
            counter.add(tokenizer(line, add_special_tokens=False)["input_ids"])
    fingerprint = vocab_fingerprint(tokenizer.get_vocab())
    return replace(counter.table(), tokenizer_fingerprint=fingerprint)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmms_sd.drafters.bigram",
                                     description="Bigram tables for the MaG draft.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="count a corpus (one document per line) into a table")
    build.add_argument("--tokenizer", required=True, help="local tokenizer directory")
    build.add_argument("--corpus", required=True, help="UTF-8 text file, one document per line")
    build.add_argument("--out", required=True, help="output JSON table")
    build.add_argument("--vocab-size", type=int, default=None,
                       help="table size (default: len(tokenizer)); give the target's "
                            "vocabulary size")
    build.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with open(args.corpus, encoding="utf-8") as f:
        n_lines = sum(1 for _ in f)
    with open(args.corpus, encoding="utf-8") as f:
        table = build_from_corpus(tokenizer, f, args.vocab_size, not args.no_progress, n_lines)
    table.save(args.out)
    known = int((table.next_token >= 0).sum())
    print(f"wrote {args.out}: {known}/{table.vocab_size} tokens with a successor, "
          f"fallback {table.fallback}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

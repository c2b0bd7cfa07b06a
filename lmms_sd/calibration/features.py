"""Features of one draft candidate, the inputs of the acceptance calibrator.

A *candidate* is a draft token y proposed as a child of some slot s of the draft tree (see
``core/tree.py``). Its features, all read from the draft side so that they exist before the
target has seen the tree:

confidence  q_s(y), the draft's conditional probability of y in slot s.
category    what kind of token y is, from its decoded text: "content", "function" (English
            function word, punctuation, whitespace, special token) or "number".
attention   the draft's attention mass on image positions at the query of slot s (the forward
            that produced q_s; ``image_attention_mass``), a float in [0, 1] (0 for a draft
            that cannot see the image). Siblings share it. The calibrator buckets it into
            quantile buckets whose edges it learns at fit time. Collection and prediction must
            read it the same way (same layer, head average).
depth       the depth of y in the tree (1 for the root's children).
margin      top-1 minus top-2 probability of the draft distribution q_s (shared by siblings).

``CandidateFeatures`` holds one candidate; ``FeatureArrays`` holds many as numpy columns, the
form the calibrator consumes. ``category_table`` classifies a whole vocabulary once, so that a
tree builder maps token ids to categories by indexing.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

CATEGORIES: tuple[str, ...] = ("content", "function", "number")
CONTENT, FUNCTION, NUMBER = range(3)

# English function words: articles, pronouns, prepositions, conjunctions, auxiliaries, common
# adverbs and determiners, and the clitics a word-piece tokenizer splits off.
FUNCTION_WORDS: frozenset[str] = frozenset("""
a an the this that these those some any each every either neither all both no not none
i me my mine you your yours he him his she her hers it its we us our ours they them their theirs
myself yourself himself herself itself ourselves themselves
who whom whose which what where when why how whether
in on at to for of with by from up down about into onto through during before after above below
between among under over out off across along around behind beyond near per than via within
without upon against toward towards
and or but nor so yet if unless until while since because though although as
is are was were be been being am have has had do does did done will would shall should can
could may might must ought
then now just only also even still again once too very quite rather almost
more most less least much many few little such same other another own
here there 's 're 've 'll 'd 'm n't
""".split())

# Spelled-out numbers count as numbers: counting answers ("there are three circles") are visual.
NUMBER_WORDS: frozenset[str] = frozenset("""
zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety
hundred thousand million billion
""".split())

# Digits with optional sign, decimal/thousands separators and a trailing percent sign.
NUMBER_RE: re.Pattern[str] = re.compile(r"^[+\-]?\d+(?:[.,]\d+)*%?$|^[+\-]?[.,]\d+%?$")

# Word-start markers of byte-level BPE and SentencePiece, should a raw piece be passed.
_WORD_MARKERS = "\u0120\u2581"


def _is_symbolic(text: str) -> bool:
    """True when every character is punctuation or a symbol (Unicode P* and S*)."""
    return all(unicodedata.category(c)[0] in "PS" for c in text)


def token_category(text: str) -> str:
    """Category of a decoded token text: "number", "function" or "content".

    " 42" and " three" -> number; " the", ",", "\\n", "</s>" -> function; " circle" -> content.
    """
    word = text.strip().strip(_WORD_MARKERS).strip()
    if not word or _is_symbolic(word):
        return CATEGORIES[FUNCTION]
    if word.startswith("<") and word.endswith(">"):  # special tokens such as <s>, <|im_end|>
        return CATEGORIES[FUNCTION]
    low = word.lower()
    if NUMBER_RE.match(low) or low in NUMBER_WORDS:
        return CATEGORIES[NUMBER]
    if low in FUNCTION_WORDS:
        return CATEGORIES[FUNCTION]
    return CATEGORIES[CONTENT]


def category_id(name: str) -> int:
    """Index of a category name in ``CATEGORIES``."""
    if name not in CATEGORIES:
        raise ValueError(f"unknown token category {name!r}; expected one of {CATEGORIES}")
    return CATEGORIES.index(name)


def category_table(decode: Callable[[int], str], vocab_size: int) -> np.ndarray:  # [V] int8
    """Category id of every token id, decoding each token once (a one-time cost per tokenizer).

    ``decode`` maps one token id to its text, e.g. ``lambda i: tok.decode([i])``.
    """
    return np.array([category_id(token_category(decode(i))) for i in range(vocab_size)],
                    dtype=np.int8)


def tokenizer_categories(tokenizer: Any, vocab_size: int) -> np.ndarray:  # [V] int8
    """``category_table`` of a Hugging Face tokenizer over ``vocab_size`` logit rows; ids past
    the tokenizer's own (a padded lm_head) decode to "" and count as function tokens."""
    n = len(tokenizer)
    return category_table(lambda i: tokenizer.decode([i]) if i < n else "", vocab_size)


def category_rules_fingerprint() -> str:
    """A hash of the category rules above: a calibrator fitted under other rules must not be
    fed categories from these."""
    rules = json.dumps([sorted(FUNCTION_WORDS), sorted(NUMBER_WORDS), NUMBER_RE.pattern,
                        list(CATEGORIES)])
    return "sha256:" + hashlib.sha256(rules.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CandidateFeatures:
    """The features of one draft candidate (meanings in the module docstring)."""

    confidence: float
    category: str
    attention: float
    depth: int
    margin: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence must be in [0, 1], got {self.confidence}")
        category_id(self.category)
        if not 0.0 <= self.attention <= 1.0:
            raise ValueError(f"attention must be in [0, 1], got {self.attention}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if not 0.0 <= self.margin <= 1.0:
            raise ValueError(f"margin must be in [0, 1], got {self.margin}")


@dataclass(frozen=True)
class FeatureArrays:
    """Many candidates as columns, all of length n.

    confidence # [n] float64; category # [n] int64 ids into CATEGORIES; attention # [n] float64;
    depth # [n] int64; margin # [n] float64
    """

    confidence: np.ndarray
    category: np.ndarray
    attention: np.ndarray
    depth: np.ndarray
    margin: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.confidence)
        for name in ("category", "attention", "depth", "margin"):
            col = getattr(self, name)
            if col.shape != (n,):
                raise ValueError(f"feature column {name} has shape {col.shape}, expected ({n},)")

    def __len__(self) -> int:
        return len(self.confidence)

    @staticmethod
    def stack(features: Sequence[CandidateFeatures]) -> FeatureArrays:
        return FeatureArrays(
            confidence=np.array([f.confidence for f in features], dtype=np.float64),
            category=np.array([category_id(f.category) for f in features], dtype=np.int64),
            attention=np.array([f.attention for f in features], dtype=np.float64),
            depth=np.array([f.depth for f in features], dtype=np.int64),
            margin=np.array([f.margin for f in features], dtype=np.float64),
        )


def quantile_edges(values: np.ndarray, n_buckets: int) -> np.ndarray:  # [n_buckets - 1]
    """Inner edges that split ``values`` into ``n_buckets`` equal-count buckets."""
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    if len(values) == 0:
        raise ValueError("cannot learn bucket edges from no values")
    return np.quantile(np.asarray(values, dtype=np.float64), np.arange(1, n_buckets) / n_buckets)


def bucketize(values: np.ndarray, edges: np.ndarray) -> np.ndarray:  # [n] int64
    """Bucket index of each value: bucket b holds edges[b-1] < v <= edges[b]."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64),
                           np.asarray(values, dtype=np.float64), side="left").astype(np.int64)


def draft_margin(draft_probs: Tensor) -> Tensor:  # [S] float
    """Top-1 minus top-2 probability of each row of # [S, V] draft distributions."""
    top = torch.topk(draft_probs.float(), min(2, draft_probs.shape[-1]), dim=-1).values
    second = top[:, 1] if top.shape[1] > 1 else torch.zeros_like(top[:, 0])
    return top[:, 0] - second


def image_attention_mass(attentions: Tensor, image_mask: Tensor) -> Tensor:  # [Q] float
    """Attention mass each query puts on image positions, clamped to [0, 1].

    attentions: # [Q, S] head-averaged attention over S key positions (``StepOutput.attentions``)
    image_mask: # [T] bool, True at image positions among the first T <= S keys (the prompt)
    """
    s_len = attentions.shape[1]
    if image_mask.shape[0] > s_len:
        raise ValueError(f"image_mask covers {image_mask.shape[0]} positions but attention has "
                         f"only {s_len} keys")
    mask = torch.zeros(s_len, dtype=attentions.dtype, device=attentions.device)
    mask[: image_mask.shape[0]] = image_mask.to(attentions.device, attentions.dtype)
    return (attentions @ mask).clamp(0.0, 1.0)


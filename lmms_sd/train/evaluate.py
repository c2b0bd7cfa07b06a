"""Measure shapes models the way they are used: through adapters and the core decoding loop.

content accuracy   greedy answers of a model scored with ``shapes.score`` (mean over items)
tau                tokens emitted per target decode step when a draft proposes chains of k
                   tokens (``GenerationStats.tau``: mean accepted length + 1), pooled over items
The speculative run also checks losslessness: every greedy speculative output must equal the
target's own greedy output token for token, else it raises.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from ..adapters.base import HFAdapter
from ..core.generate import GenerationConfig, generate
from ..data.shapes import TOPICS, ShapesItem, make_items, score
from ..drafters.model import ModelDrafter
from ..trees.chain import ChainBuilder, ChainConfig

MAX_NEW_TOKENS = 80  # the longest reference answer is 44 tokens with the recipe's BPE


def eval_items(n_describe: int = 48, n_qa: int = 48, seed: int = 0) -> list[ShapesItem]:
    """Held-out test-split items; the defaults are the items of the shipped lmms-eval parquet
    (``shapes_caption`` then ``shapes_qa``)."""
    return (make_items(n_describe, seed, "test", ("describe",))
            + make_items(n_qa, seed, "test", ("count", "colours", "where")))


def _config(adapter: HFAdapter) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, eos_token_ids=adapter.eos_token_ids)


def greedy_outputs(model: HFAdapter, items: Sequence[ShapesItem],
                   prompter: HFAdapter | None = None) -> list[list[int]]:
    """``model``'s greedy answer tokens (EOS included when emitted) per item, to prompts
    prepared by ``prompter`` (default: the model itself)."""
    prompter = prompter or model
    return [generate(model, prompter.prepare(it.question, [it.image]), _config(model)).tokens
            for it in items]


@dataclass(frozen=True)
class AccuracyReport:
    accuracy: float               # mean content score over all items
    by_topic: dict[str, float]    # mean per topic present
    n_items: int

    def to_dict(self) -> dict:
        return {"content_accuracy": self.accuracy, "by_topic": self.by_topic,
                "n_items": self.n_items}


def content_accuracy(texts: Sequence[str], items: Sequence[ShapesItem]) -> AccuracyReport:
    """Score decoded answers ``texts`` against their items."""
    if len(texts) != len(items) or not items:
        raise ValueError(f"need one answer per item and at least one item; got {len(texts)} "
                         f"answers for {len(items)} items")
    scores: dict[str, list[float]] = defaultdict(list)
    for text, it in zip(texts, items):
        scores[it.content.topic].append(score(text, it.content))
    flat = [s for topic in scores.values() for s in topic]
    by_topic = {t: sum(scores[t]) / len(scores[t]) for t in TOPICS if t in scores}
    return AccuracyReport(sum(flat) / len(flat), by_topic, len(flat))


def model_accuracy(model: HFAdapter, items: Sequence[ShapesItem],
                   prompter: HFAdapter | None = None) -> AccuracyReport:
    """Content accuracy of ``model``'s greedy answers to prompts prepared by ``prompter``
    (default: the model itself). A draft is measured on its target's prompts, as it drafts:
    a text-only LM then sees them with the image placeholders removed."""
    outputs = greedy_outputs(model, items, prompter)
    return content_accuracy([model.decode(o) for o in outputs], items)


@dataclass(frozen=True)
class SpeculativeReport:
    k: int
    tau: float               # emitted tokens per target decode step, pooled over items
    acceptance_rate: float   # accepted / drafted tokens, pooled
    n_items: int             # every one checked equal to the target's greedy output

    def to_dict(self) -> dict:
        return {"k": self.k, "tau": self.tau, "acceptance_rate": self.acceptance_rate,
                "n_items": self.n_items, "lossless": True}


def speculative(target: HFAdapter, draft: HFAdapter, items: Sequence[ShapesItem], k: int,
                text_only: bool, reference: Sequence[Sequence[int]] | None = None,
                ) -> SpeculativeReport:
    """Greedy speculative decoding with a chain of ``k`` draft tokens on every item.

    reference: the target's greedy outputs (computed when None). Raises on any difference."""
    reference = reference if reference is not None else greedy_outputs(target, items)
    drafter = ModelDrafter(draft, text_only=text_only, vocab_size=target.vocab_size)
    builder = ChainBuilder(ChainConfig(k))
    steps = emitted = accepted = drafted = 0
    for it, ref in zip(items, reference, strict=True):
        res = generate(target, target.prepare(it.question, [it.image]), _config(target),
                       drafter, builder)
        if res.tokens != list(ref):
            raise AssertionError(f"speculative output differs from the target's greedy output "
                                 f"on {it.uid}: {res.tokens} vs {list(ref)}")
        stats = res.stats
        steps += stats.decode_steps
        emitted += sum(s.accepted + 1 for s in stats.steps)
        accepted += sum(s.accepted for s in stats.steps)
        drafted += stats.drafted
    return SpeculativeReport(k, emitted / max(steps, 1), accepted / max(drafted, 1), len(items))

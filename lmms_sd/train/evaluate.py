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
from ..core.interfaces import Drafter, PromptInputs
from ..data.shapes import TOPICS, ShapesItem, make_items, score
from ..drafters.model import ModelDrafter
from ..trees import TreeBuilder
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


@dataclass(frozen=True)
class PooledDecoding:
    """Step statistics of greedy speculative decoding, summed over prompts."""

    decode_steps: int
    emitted: int          # tokens emitted by decode steps: accepted + 1 per step
    accepted: int         # accepted draft tokens
    drafted: int          # drafted depths (``GenerationStats.drafted``)
    tree_nodes: int       # draft tokens the target verified
    draft_forwards: int   # drafter forwards (a draft model's prefill included)

    @property
    def tau(self) -> float:
        return self.emitted / max(self.decode_steps, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


def lossless_decoding(target: HFAdapter, drafter: Drafter, builder: TreeBuilder,
                      prompts: Sequence[PromptInputs], references: Sequence[Sequence[int]],
                      cfg: GenerationConfig, what: str,
                      names: Sequence[str] | None = None) -> PooledDecoding:
    """Greedy speculative decoding of every prompt, its step statistics pooled. Raises an
    AssertionError naming ``what`` and the prompt (``names``, else its index) on any output
    that differs from its reference, the target's own greedy output."""
    names = names if names is not None else [f"prompt {i}" for i in range(len(prompts))]
    steps = emitted = accepted = drafted = nodes = forwards = 0
    for prompt, ref, name in zip(prompts, references, names, strict=True):
        res = generate(target, prompt, cfg, drafter, builder)
        if res.tokens != list(ref):
            raise AssertionError(f"{what} differs from the target's greedy output on {name}: "
                                 f"{res.tokens} vs {list(ref)}")
        stats = res.stats
        steps += stats.decode_steps
        emitted += sum(s.accepted + 1 for s in stats.steps)
        accepted += sum(s.accepted for s in stats.steps)
        drafted += stats.drafted
        nodes += sum(s.tree_size for s in stats.steps)
        forwards += stats.draft_forwards
    return PooledDecoding(steps, emitted, accepted, drafted, nodes, forwards)


def speculative(target: HFAdapter, draft: HFAdapter, items: Sequence[ShapesItem], k: int,
                text_only: bool, reference: Sequence[Sequence[int]] | None = None,
                ) -> SpeculativeReport:
    """Greedy speculative decoding with a chain of ``k`` draft tokens on every item.

    reference: the target's greedy outputs (computed when None). Raises on any difference."""
    reference = reference if reference is not None else greedy_outputs(target, items)
    drafter = ModelDrafter(draft, text_only=text_only, vocab_size=target.vocab_size)
    prompts = [target.prepare(it.question, [it.image]) for it in items]
    pooled = lossless_decoding(target, drafter, ChainBuilder(ChainConfig(k)), prompts, reference,
                               _config(target), "speculative output", [it.uid for it in items])
    return SpeculativeReport(k, pooled.tau, pooled.acceptance_rate, len(items))

"""Simulated cost of a decode, in CS Drafting's units, so results compare with the paper's.

CS Drafting reports a "standardized walltime improvement": every model forward costs a fixed
number of units, and the speedup is the autoregressive target's cost over the cascade's cost.
Its two counters (``model.py``, ``TIME_COST``):
  model_parameters  units proportional to parameter count, in millions (flan-t5 small 60,
                    base 220, large 770, xl 3000, xxl 11300; llama-68m 68, llama-160m 160).
                    The published table gives LLaMA-7B 70000, not 7000; kept as published.
  previous_work     per-forward latency relative to the target (FLAN-T5-XXL = 1) as measured by
                    earlier speculative decoding work (Leviathan et al. 2023): small 0.02,
                    base 0.04, large 0.11. Only T5 models have entries.
A model's unit is found as published: the first key of the table (in order) that is a
substring of the model's name. MaG costs nothing.

What counts as a forward (``counting``):
  reviews   the published convention: one unit per review pass of a draft (scoring a proposal)
            and per target forward; a bottom draft's own autoregressive proposals are free.
  forwards  every model call our drafters make (``Drafter.forwards``), which also counts the
            ``root()`` forward that feeds a draft the tokens emitted since its last step.
The target counts its prefill, which emits the first token (the published loop processes the
prompt inside its first review); the autoregressive baseline costs one target forward per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

COST_TABLES: dict[str, dict[str, float]] = {
    "model_parameters": {
        "xxl": 11300, "small": 60, "base": 220, "large": 770, "xl": 3000,
        "JackFram/llama-68m": 68, "JackFram/llama-160m": 160, "7b": 70000, "llama": 70000,
    },
    "previous_work": {"xxl": 1, "small": 0.02, "base": 0.04, "large": 0.11},
}
COUNTINGS = ("reviews", "forwards")


def unit_cost(model_name: str, counter_version: str = "model_parameters",
              overrides: Mapping[str, float] | None = None) -> float:
    """Units per forward of ``model_name``: an exact key of ``overrides``, else the published
    substring lookup in ``COST_TABLES[counter_version]``."""
    if overrides and model_name in overrides:
        return float(overrides[model_name])
    if counter_version not in COST_TABLES:
        raise ValueError(f"unknown counter_version {counter_version!r}; "
                         f"choose one of {sorted(COST_TABLES)}")
    for key, cost in COST_TABLES[counter_version].items():
        if key in model_name:
            return float(cost)
    raise ValueError(f"no {counter_version} cost for model {model_name!r}: name a cost for it "
                     f"in overrides (known keys: {list(COST_TABLES[counter_version])})")


@dataclass(frozen=True)
class CostReport:
    """counts: forwards (or reviews) per model; units: counts x unit cost per model."""

    counter_version: str
    counting: str
    counts: dict[str, int]
    units: dict[str, float]
    new_tokens: int
    target_unit: float

    @property
    def total(self) -> float:
        return sum(self.units.values())

    @property
    def autoregressive(self) -> float:
        """The target alone: one forward per emitted token."""
        return self.new_tokens * self.target_unit

    @property
    def speedup(self) -> float:
        return self.autoregressive / self.total if self.total > 0 else 0.0

    def to_dict(self) -> dict:
        return {"counter_version": self.counter_version, "counting": self.counting,
                "counts": dict(self.counts), "units": dict(self.units), "total": self.total,
                "autoregressive": self.autoregressive, "speedup": self.speedup}


def simulate_cost(target_name: str, target_forwards: int, draft_counts: Mapping[str, int],
                  new_tokens: int, counter_version: str = "model_parameters",
                  counting: str = "reviews",
                  overrides: Mapping[str, float] | None = None) -> CostReport:
    """Price one decode. ``draft_counts`` maps each draft's name to its count under
    ``counting``; a draft with count 0 (MaG, a bottom draft under "reviews") is not priced."""
    if counting not in COUNTINGS:
        raise ValueError(f"unknown counting {counting!r}; choose one of {COUNTINGS}")
    target_unit = unit_cost(target_name, counter_version, overrides)
    counts = {target_name: target_forwards, **draft_counts}
    if len(counts) != len(draft_counts) + 1:
        raise ValueError(f"draft names must differ from the target's ({target_name!r})")
    units = {name: (n * unit_cost(name, counter_version, overrides) if n else 0.0)
             for name, n in counts.items()}
    return CostReport(counter_version, counting, counts, units, new_tokens, target_unit)

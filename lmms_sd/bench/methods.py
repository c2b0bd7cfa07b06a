"""The methods a benchmark compares, each a (drafter, tree) recipe over loaded models.

A method is named ``<drafter>:<tree>[:key=value;key=value]``, e.g. ``draft_vlm:chain:k=4`` or
``text_only:dynamic:depth=4;top_k=4;total_tokens=16``. Drafters:
  draft_vlm   a small VLM of the target's family (sees the image)
  text_only   a text-only LM sharing the vocabulary (prompt without image tokens)
  msd         an MSD / EAGLE-style draft head on the target's features
  mag         CS Drafting's MaG: longest suffix match in prompt and output (no model)
  oracle      the target's own continuation, right with probability ``alpha`` per token, at
              zero draft cost (engine efficiency; see ``efficiency.py``)
``ar`` (no drafter) is plain autoregressive decoding through the same loop. The tree ``auto``
(``draft_vlm:auto``, ``msd:auto:kinds=chain;max_nodes=32``) is planned at start-up by the
benchmark (``lmms_sd/trees/auto.py``), like ``dynamic:total_tokens=-1`` (MSD) and
``static:budget=-1`` (Sequoia).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..core.interfaces import Drafter
from ..trees import make_builder

DEFAULT_METHODS = (
    "ar",
    "draft_vlm:auto",
    "draft_vlm:chain:k=4",
    "text_only:chain:k=4",
    "draft_vlm:static:acceptance=0.6;0.2;0.1;budget=16;depth=6",
    "draft_vlm:dynamic:depth=5;top_k=4;total_tokens=16",
    "draft_vlm:opt:nodes=16;threshold=0.2;max_depth=8",
    "mag:chain:k=10",
)


@dataclass(frozen=True)
class Method:
    name: str
    drafter: str | None
    tree: str = "chain"
    tree_params: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def parse(spec: str) -> "Method":
        if spec == "ar":
            return Method("ar", None)
        parts = spec.split(":", 2)
        if len(parts) < 2:
            raise ValueError(f"method {spec!r}: expected <drafter>:<tree>[:k=v;...] or 'ar'")
        params: list[tuple[str, str]] = []
        for item in (parts[2].split(";") if len(parts) == 3 and parts[2] else []):
            if "=" in item:
                key, value = item.split("=", 1)
                params.append((key.strip(), value.strip()))
            elif params:  # a ';' inside a value, e.g. acceptance=0.6;0.2
                key, value = params[-1]
                params[-1] = (key, f"{value},{item.strip()}")
            else:
                raise ValueError(f"method {spec!r}: {item!r} is not key=value")
        return Method(spec, parts[0], parts[1], tuple(params))

    def builder(self) -> Callable | None:
        return None if self.drafter is None else make_builder(self.tree, **dict(self.tree_params))


def make_drafter(kind: str, models: dict[str, Any], reference: list[int] | None = None,
                 alpha: float = 1.0, seed: int = 0) -> Drafter:
    """A fresh drafter of ``kind`` over the loaded ``models`` (adapters by role)."""
    from ..drafters.model import ModelDrafter

    target = models["target"]
    if kind in ("draft_vlm", "text_only"):
        if kind not in models:
            raise ValueError(f"method needs a {kind} model; none was given")
        return ModelDrafter(models[kind], text_only=kind == "text_only",
                            vocab_size=target.vocab_size)
    if kind == "oracle":
        from .oracle import OracleDrafter

        if reference is None:
            raise ValueError("the oracle drafter needs the reference output")
        return OracleDrafter(reference, alpha, target.vocab_size, seed)
    if kind == "mag":
        from ..drafters.ngram import MaGDrafter

        return MaGDrafter(target.vocab_size)
    if kind == "msd":
        if "msd" not in models:
            raise ValueError("method needs an MSD head (--msd PATH)")
        return models["msd"]()
    raise ValueError(f"unknown drafter {kind!r}; choose from draft_vlm, text_only, msd, mag, oracle")

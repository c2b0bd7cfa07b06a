"""Tree builders by name: ``make_builder("dynamic", depth=6)``.

name      settings (one frozen dataclass each)      what it drafts
chain     ChainConfig(k)                             k tokens in a line
static    StaticConfig(growmap, acceptance, budget,  a fixed Sequoia shape (or Sequoia's
          depth | max_budget, max_depth)              root-counting max_budget, max_depth)
dynamic   DynamicConfig(depth, top_k, total_tokens)  EAGLE-2's best-first tree (MSD; total_tokens
                                                     counts the root)
opt       OptConfig(nodes, threshold, max_depth,     OPT-Tree with early stop
          top_k)
cascade   CascadeTreeConfig()                        a CascadeDrafter's own chain (CS Drafting)

Parameters may be strings (from a command line); they are converted to the type of the
settings field. An unknown name or parameter, or a value that does not convert, is an error.
Hooks that are not settings are passed to the builder itself, e.g. an acceptance calibrator
for OPT-Tree: ``OptBuilder(OptConfig(...), score_fn=...)`` (see ``opt.py``).
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any

from .base import TreeBuilder
from .chain import ChainBuilder, ChainConfig
from .dynamic import DynamicBuilder, DynamicConfig
from .opt import OptBuilder, OptConfig
from .static import StaticBuilder, StaticConfig


@dataclasses.dataclass(frozen=True)
class CascadeTreeConfig:
    """No settings: the chain's length is the cascade's (its ``k_matrix``)."""


def _cascade_builder(cfg: CascadeTreeConfig) -> TreeBuilder:
    from ..drafters.cascade import CascadeBuilder  # deferred: drafters build on trees' core

    return CascadeBuilder()


BUILDERS: dict[str, tuple[type, Callable[[Any], TreeBuilder]]] = {
    "chain": (ChainConfig, ChainBuilder),
    "static": (StaticConfig, StaticBuilder.from_config),
    "dynamic": (DynamicConfig, DynamicBuilder),
    "opt": (OptConfig, OptBuilder),
    "cascade": (CascadeTreeConfig, _cascade_builder),
}

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def make_builder(name: str, **params: Any) -> TreeBuilder:
    """The builder called ``name`` with its settings from ``params``."""
    if name not in BUILDERS:
        raise ValueError(f"unknown tree builder {name!r}; choose from {sorted(BUILDERS)}")
    cfg_type, build = BUILDERS[name]
    types = typing.get_type_hints(cfg_type)
    known = [f.name for f in dataclasses.fields(cfg_type)]
    for key in params:
        if key not in known:
            raise ValueError(f"unknown parameter {key!r} for tree builder {name!r}; "
                             f"it takes {known}")
    return build(cfg_type(**{k: _convert(v, types[k], f"{name}.{k}") for k, v in params.items()}))


def _convert(value: Any, kind: type, what: str) -> Any:
    """``value`` as a ``kind`` (bool, int, float, str, or ``X | None``); strings are parsed."""
    args = typing.get_args(kind)
    if type(None) in args and len(args) == 2:  # X | None: "none" or an X
        if value is None or str(value).strip().lower() in ("none", "null"):
            return None
        kind = next(a for a in args if a is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
    elif kind is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif kind is str:
        return str(value)
    raise ValueError(f"tree setting {what}: cannot read {value!r} as {kind.__name__}")


__all__ = [
    "BUILDERS",
    "ChainBuilder",
    "ChainConfig",
    "DynamicBuilder",
    "DynamicConfig",
    "OptBuilder",
    "OptConfig",
    "StaticBuilder",
    "StaticConfig",
    "TreeBuilder",
    "make_builder",
]

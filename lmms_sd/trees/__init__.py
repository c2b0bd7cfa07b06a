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
auto      AutoConfig(kinds, max_nodes, ...)          planned at start-up from measured costs

``auto`` needs measurements before it is a builder: ``auto_config`` reads its settings (and
the special cases under their own names: ``dynamic`` with ``total_tokens=-1`` is MSD's start-up
choice among 40/48/50/56/60 tokens; ``static`` with ``budget=-1`` is Sequoia's hardware-aware
(budget, depth) choice up to ``max_depth``); ``lmms_sd/lmms_eval/autotree.py`` measures and
``auto.plan_tree`` picks (see ``auto.py``).

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

from .auto import MSD_TOTALS, AutoConfig
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
        hint = " (tree=auto is planned at start-up: see auto_config)" if name == "auto" else ""
        raise ValueError(f"unknown tree builder {name!r}; choose from {sorted(BUILDERS)}{hint}")
    cfg_type, build = BUILDERS[name]
    types = typing.get_type_hints(cfg_type)
    known = [f.name for f in dataclasses.fields(cfg_type)]
    for key in params:
        if key not in known:
            raise ValueError(f"unknown parameter {key!r} for tree builder {name!r}; "
                             f"it takes {known}")
    return build(cfg_type(**{k: _convert(v, types[k], f"{name}.{k}") for k, v in params.items()}))


def auto_config(name: str, **params: Any) -> AutoConfig | None:
    """The ``AutoConfig`` of ``tree=auto`` or of its special cases; None for a plain builder."""
    if name == "dynamic" and str(params.get("total_tokens", "")).strip() == "-1":
        rest = {k: v for k, v in params.items() if k != "total_tokens"}
        _known(name, rest, ("depth", "top_k"))
        return AutoConfig(kinds="dynamic", max_nodes=max(MSD_TOTALS) + 1,
                          top_k=_convert(rest.get("top_k", 10), int, "dynamic.top_k"),
                          dynamic_depth=_convert(rest.get("depth", 5), int, "dynamic.depth"),
                          dynamic_totals=";".join(map(str, MSD_TOTALS)))
    if name == "static" and str(params.get("budget", "")).strip() == "-1":
        rest = {k: v for k, v in params.items() if k != "budget"}
        _known(name, rest, ("depth", "max_depth", "acceptance"))
        if "depth" in rest and "max_depth" in rest:
            raise ValueError("static tree: give depth (draft levels) or max_depth (Sequoia's, "
                             "the root counted), not both")
        depth = (_convert(rest["max_depth"], int, "static.max_depth") - 1 if "max_depth" in rest
                 else _convert(rest.get("depth", 8), int, "static.depth"))
        return AutoConfig(kinds="static", max_depth=depth,
                          acceptance=str(rest.get("acceptance", "")))
    if name != "auto":
        return None
    types = typing.get_type_hints(AutoConfig)
    _known(name, params, [f.name for f in dataclasses.fields(AutoConfig)])
    return AutoConfig(**{k: _convert(v, types[k], f"auto.{k}") for k, v in params.items()})


def _known(name: str, params: dict[str, Any], known: typing.Sequence[str]) -> None:
    for key in params:
        if key not in known:
            raise ValueError(f"unknown parameter {key!r} for tree builder {name!r}; "
                             f"it takes {list(known)}")


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
    "AutoConfig",
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
    "auto_config",
    "make_builder",
]

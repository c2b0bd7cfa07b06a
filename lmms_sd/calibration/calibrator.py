"""Grouped isotonic calibration of draft confidence into acceptance probability.

Draft confidence q(y) is a poor estimate of whether the target accepts y, and how poor depends on
the kind of token: function words and punctuation are accepted more often than their confidence
says, visually grounded content words less. The calibrator (the "Calibrated OPT-Tree" thesis)
fits one monotone map confidence -> acceptance per group of candidates:

level 0  global                          always fitted
level 1  token category                  {content, function, number}
level 2  category x attention bucket     quantile buckets of image attention (quintiles)
level 3  level 2 x depth and/or margin   optional (``finer``): depth buckets split at
                                         ``depth_edges``, margin quantile buckets

A group is fitted only with at least ``min_samples`` candidates; a candidate is predicted by the
finest fitted group it belongs to, so a sparse group falls back to its coarser parent. Each map
is scikit-learn's ``IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1)``, stored as its
breakpoints (``X_thresholds_``, ``y_thresholds_``); prediction is linear interpolation between
them (``np.interp``, clipped at the ends), which is exactly what sklearn's ``predict`` computes.

Which label to fit (``label``): "hard" (y == target argmax) for greedy decoding; "target_prob"
(p(y)) for deterministic children under stochastic verification; "soft" (min(1, p/q), the
thesis's choice) for sampled chains. See ``traces.py``.

Saved file (JSON, never pickle), format ``lmms_sd.grouped_isotonic`` version 1::

  format, version          "lmms_sd.grouped_isotonic", 1
  tokenizer_fingerprint    whoever fits names the tokenizer (e.g. ``vocab_fingerprint``)
  category_rules           ``category_rules_fingerprint()`` of the rules used for categories
  label                    "soft" | "hard" | "target_prob"
  config                   the CalibratorConfig fields
  categories               ["content", "function", "number"]
  bucket_edges             {"attention": [...], "depth": [...], "margin": [...]}; bucket b
                           holds edges[b-1] < v <= edges[b]
  levels                   dimensions of levels 1.. e.g. [["category"], ["category", "attention"]]
  group_counts             {group key: training samples}, fitted or not
  groups                   {group key: {"n": int, "x": [...], "y": [...]}}, fitted groups only

Group keys: "global", "content", "content/a3", "content/a3/d1/m0" (a = attention bucket,
d = depth bucket, m = margin bucket).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.isotonic import IsotonicRegression
from torch import Tensor
from tqdm import tqdm

from .features import (CATEGORIES, CandidateFeatures, FeatureArrays, bucketize,
                       category_rules_fingerprint, draft_margin, quantile_edges)
from .traces import LABELS

CALIBRATOR_FORMAT = "lmms_sd.grouped_isotonic"
CALIBRATOR_VERSION = 1
FINER_DIMS: tuple[str, ...] = ("depth", "margin")
GLOBAL = "global"


@dataclass(frozen=True)
class CalibratorConfig:
    """attention_buckets: quantile buckets of image attention (5 = quintiles);
    min_samples: fewest candidates for a group to get its own map;
    finer: dimensions of the optional level 3, a subset of ("depth", "margin");
    depth_edges: depth bucket edges ((2,) puts depths 1-2 and 3+ apart);
    margin_buckets: quantile buckets of the draft margin (level 3 only)."""

    attention_buckets: int = 5
    min_samples: int = 200
    finer: tuple[str, ...] = ()
    depth_edges: tuple[int, ...] = (2,)
    margin_buckets: int = 3

    def __post_init__(self) -> None:
        if self.attention_buckets < 1 or self.margin_buckets < 1:
            raise ValueError(f"bucket counts must be >= 1, got attention_buckets="
                             f"{self.attention_buckets}, margin_buckets={self.margin_buckets}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples}")
        bad = [d for d in self.finer if d not in FINER_DIMS]
        if bad or len(set(self.finer)) != len(self.finer):
            raise ValueError(f"finer must be distinct names from {FINER_DIMS}, got {self.finer}")
        if list(self.depth_edges) != sorted(set(self.depth_edges)):
            raise ValueError(f"depth_edges must be strictly increasing, got {self.depth_edges}")

    @property
    def levels(self) -> list[tuple[str, ...]]:
        """Dimensions of levels 1.. (level 0, global, has none)."""
        out = [("category",), ("category", "attention")]
        if self.finer:
            out.append(("category", "attention", *self.finer))
        return out


@dataclass(frozen=True)
class IsotonicCurve:
    """A fitted monotone map as breakpoints. x # [K] strictly increasing; y # [K] in [0, 1]."""

    x: np.ndarray
    y: np.ndarray
    n: int

    def __call__(self, confidence: np.ndarray) -> np.ndarray:  # [m] -> [m]
        return np.interp(confidence, self.x, self.y)

    @staticmethod
    def from_sklearn(iso: IsotonicRegression, n: int) -> IsotonicCurve:
        return IsotonicCurve(np.asarray(iso.X_thresholds_, dtype=np.float64).copy(),
                             np.asarray(iso.y_thresholds_, dtype=np.float64).copy(), n)

    @staticmethod
    def fit(confidence: np.ndarray, labels: np.ndarray) -> IsotonicCurve:
        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0, increasing=True)
        iso.fit(np.asarray(confidence, dtype=np.float64), np.asarray(labels, dtype=np.float64))
        return IsotonicCurve.from_sklearn(iso, len(confidence))

    def to_json(self) -> dict:
        return {"n": self.n, "x": self.x.tolist(), "y": self.y.tolist()}

    @staticmethod
    def from_json(obj: Mapping) -> IsotonicCurve:
        return IsotonicCurve(np.asarray(obj["x"], dtype=np.float64),
                             np.asarray(obj["y"], dtype=np.float64), int(obj["n"]))


def vocab_fingerprint(vocab: Mapping[str, int]) -> str:
    """A short stable hash of a tokenizer's vocabulary (``tokenizer.get_vocab()``)."""
    blob = json.dumps(sorted(vocab.items()), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def _group_key(dims: Sequence[str], values: Sequence[int]) -> str:
    parts = [CATEGORIES[v] if d == "category" else f"{d[0]}{v}" for d, v in zip(dims, values)]
    return "/".join(parts)


def _groups(columns: Mapping[str, np.ndarray], dims: Sequence[str]
            ) -> list[tuple[str, np.ndarray]]:  # (key, # [n] bool member mask)
    """The non-empty groups of one level: each distinct combination of bucket values."""
    rows = np.stack([columns[d] for d in dims])  # [len(dims), n]
    if rows.shape[1] == 0:
        return []
    uniq, inverse = np.unique(rows, axis=1, return_inverse=True)
    inverse = inverse.reshape(-1)
    return [(_group_key(dims, uniq[:, j].tolist()), inverse == j) for j in range(uniq.shape[1])]


def _bucket_columns(f: FeatureArrays, edges: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The bucket index of every candidate in every dimension, each # [n] int64."""
    if len(f) and (f.category.min() < 0 or f.category.max() >= len(CATEGORIES)):
        raise ValueError(f"category ids must be in [0, {len(CATEGORIES)}), got "
                         f"[{f.category.min()}, {f.category.max()}]")
    return {"category": f.category,
            "attention": bucketize(f.attention, edges["attention"]),
            "depth": bucketize(f.depth, edges["depth"]),
            "margin": bucketize(f.margin, edges["margin"])}


def _as_numpy(x: object, dtype: type) -> np.ndarray:
    """numpy view of an array-like or a (CPU or accelerator) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


class GroupedIsotonicCalibrator:
    """Calibrated acceptance probability of draft candidates (see the module docstring).

    Build with ``fit`` or ``load``; use ``predict`` / ``predict_arrays``.
    """

    def __init__(self, config: CalibratorConfig, tokenizer_fingerprint: str, label: str,
                 edges: Mapping[str, np.ndarray], curves: Mapping[str, IsotonicCurve],
                 group_counts: Mapping[str, int]) -> None:
        if label not in LABELS:
            raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")
        if GLOBAL not in curves:
            raise ValueError("a calibrator needs a global curve")
        self.config = config
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.label = label
        self.edges = {d: np.asarray(edges[d], dtype=np.float64) for d in ("attention", "depth",
                                                                          "margin")}
        self.curves = dict(curves)
        self.group_counts = dict(group_counts)

    # ------------------------------------------------------------------ fitting
    @staticmethod
    def fit(features: FeatureArrays, labels: np.ndarray, tokenizer_fingerprint: str,
            config: CalibratorConfig = CalibratorConfig(), label: str = "soft",
            progress: bool = False) -> GroupedIsotonicCalibrator:
        """Learn bucket edges, then one isotonic curve per group with enough samples.

        labels: # [n] the ``label`` column of the traces (values in [0, 1])
        """
        labels = np.asarray(labels, dtype=np.float64)
        if len(features) == 0 or labels.shape != (len(features),):
            raise ValueError(f"need n > 0 labels matching {len(features)} feature rows, got "
                             f"shape {labels.shape}")
        edges = {
            "attention": quantile_edges(features.attention, config.attention_buckets),
            "depth": np.asarray(config.depth_edges, dtype=np.float64),
            "margin": (quantile_edges(features.margin, config.margin_buckets)
                       if "margin" in config.finer else np.zeros(0)),
        }
        conf = features.confidence
        curves = {GLOBAL: IsotonicCurve.fit(conf, labels)}
        counts = {GLOBAL: len(conf)}
        columns = _bucket_columns(features, edges)
        todo = [g for dims in config.levels for g in _groups(columns, dims)]
        for key, member in tqdm(todo, desc="fitting groups", disable=not progress):
            counts[key] = int(member.sum())
            if counts[key] >= config.min_samples:
                curves[key] = IsotonicCurve.fit(conf[member], labels[member])
        return GroupedIsotonicCalibrator(config, tokenizer_fingerprint, label, edges, curves,
                                         counts)

    # ------------------------------------------------------------------ prediction
    def resolve(self, features: FeatureArrays) -> list[tuple[str, np.ndarray]]:
        """(group key, # [n] bool mask) pairs, coarse to fine, of the fitted groups that predict
        each candidate; a later pair overrides an earlier one where both cover a candidate."""
        columns = _bucket_columns(features, self.edges)
        out = [(GLOBAL, np.ones(len(features), dtype=bool))]
        for dims in self.config.levels:
            out += [(k, m) for k, m in _groups(columns, dims) if k in self.curves]
        return out

    def groups_used(self, features: FeatureArrays) -> np.ndarray:  # [n] str
        """The key of the group whose curve predicts each candidate."""
        keys = np.full(len(features), GLOBAL, dtype=object)
        for key, member in self.resolve(features):
            keys[member] = key
        return keys

    def predict(self, features: FeatureArrays | Sequence[CandidateFeatures]) -> np.ndarray:
        """Calibrated acceptance probability # [n] float64 of each candidate."""
        if not isinstance(features, FeatureArrays):
            features = FeatureArrays.stack(features)
        out = np.empty(len(features), dtype=np.float64)
        for key, member in self.resolve(features):
            out[member] = self.curves[key](features.confidence[member])
        return out

    def predict_arrays(self, confidence: object, category_ids: object, attention: object,
                       depth: object | None = None, margin: object | None = None) -> np.ndarray:
        """``predict`` on columns (numpy arrays or torch tensors, each # [n]): the form a tree
        builder has. ``depth`` / ``margin`` may be None when level 3 does not use them."""
        conf = _as_numpy(confidence, np.float64)
        missing = [d for d, v in (("depth", depth), ("margin", margin))
                   if v is None and d in self.config.finer]
        if missing:
            raise ValueError(f"this calibrator's finest level needs {missing}")
        n = len(conf)
        f = FeatureArrays(conf, _as_numpy(category_ids, np.int64), _as_numpy(attention, np.float64),
                          np.ones(n, np.int64) if depth is None else _as_numpy(depth, np.int64),
                          np.zeros(n) if margin is None else _as_numpy(margin, np.float64))
        return self.predict(f)

    def predict_children(self, probs: Tensor, tokens: Tensor, dists: Tensor, depth: int,
                         categories: np.ndarray, attention: Tensor | None = None) -> Tensor:
        """Calibrated acceptance of the children offered by m tree nodes, for a tree builder.

        probs:      # [m, c] draft probability of each child
        tokens:     # [m, c] long, the child tokens
        dists:      # [m, V] each parent's draft distribution (for the margin)
        depth:      depth of the children (1 = children of the root)
        categories: # [V] category id per token id (``category_table``)
        attention:  # [m] each parent slot's draft image-attention mass; None means 0
        returns     # [m, c] float32 on ``probs.device``
        """
        m, c = probs.shape
        attn = torch.zeros(m) if attention is None else attention.detach().float().cpu()
        out = self.predict_arrays(
            probs.detach().double().cpu().reshape(-1),
            np.asarray(categories)[tokens.detach().cpu().numpy().reshape(-1)],
            attn[:, None].expand(m, c).reshape(-1),
            np.full(m * c, depth, dtype=np.int64),
            draft_margin(dists.detach())[:, None].expand(m, c).reshape(-1).cpu())
        return torch.from_numpy(out).float().reshape(m, c).to(probs.device)

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> dict:
        cfg = asdict(self.config)
        cfg["finer"], cfg["depth_edges"] = list(self.config.finer), list(self.config.depth_edges)
        return {
            "format": CALIBRATOR_FORMAT, "version": CALIBRATOR_VERSION,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "category_rules": category_rules_fingerprint(), "label": self.label, "config": cfg,
            "categories": list(CATEGORIES),
            "bucket_edges": {d: e.tolist() for d, e in self.edges.items()},
            "levels": [list(dims) for dims in self.config.levels],
            "group_counts": self.group_counts,
            "groups": {k: c.to_json() for k, c in self.curves.items()},
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @staticmethod
    def from_json(obj: Mapping, tokenizer_fingerprint: str | None) -> GroupedIsotonicCalibrator:
        """Rebuild from ``to_json`` output. ``tokenizer_fingerprint`` must equal the saved one;
        pass None only to inspect a file without a tokenizer at hand."""
        fmt, ver = obj.get("format"), obj.get("version")
        if fmt != CALIBRATOR_FORMAT or ver != CALIBRATOR_VERSION:
            raise ValueError(f"unsupported calibrator file: format={fmt!r} version={ver!r}; "
                             f"this code reads {CALIBRATOR_FORMAT!r} version {CALIBRATOR_VERSION}")
        saved = obj["tokenizer_fingerprint"]
        if tokenizer_fingerprint is not None and saved != tokenizer_fingerprint:
            raise ValueError(f"calibrator was fitted for tokenizer {saved!r}, but the tokenizer "
                             f"in use is {tokenizer_fingerprint!r}")
        if obj["category_rules"] != category_rules_fingerprint() or \
                list(obj["categories"]) != list(CATEGORIES):
            raise ValueError(f"calibrator was fitted under token category rules "
                             f"{obj['category_rules']!r}, these are "
                             f"{category_rules_fingerprint()!r}: refit it")
        c = obj["config"]
        config = CalibratorConfig(int(c["attention_buckets"]), int(c["min_samples"]),
                                  tuple(c["finer"]), tuple(int(e) for e in c["depth_edges"]),
                                  int(c["margin_buckets"]))
        curves = {k: IsotonicCurve.from_json(v) for k, v in obj["groups"].items()}
        return GroupedIsotonicCalibrator(config, saved, obj["label"], obj["bucket_edges"], curves,
                                         obj["group_counts"])

    @staticmethod
    def load(path: str | Path, tokenizer_fingerprint: str | None) -> GroupedIsotonicCalibrator:
        return GroupedIsotonicCalibrator.from_json(json.loads(Path(path).read_text()),
                                                   tokenizer_fingerprint)

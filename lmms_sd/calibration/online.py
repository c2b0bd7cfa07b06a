"""The Calibrated OPT-Tree as a decoding session: online (``train_ratio``) or offline
(``calibrator=PATH``).

Online mode, as published: the first ``ceil(train_ratio * n)`` of a task's n requests are
*calibration* requests. They are decoded with the plain OPT-Tree (draft probability as the
score) while the ``generate()`` observer labels every verified step from the verify forward
(``recording.py``). When the task's first *measured* request starts, a grouped isotonic
calibrator is fitted on that task's traces, and the task's remaining requests are decoded with
the calibrated tree (``steering.py``). Statistics should be reported for measured requests only
(``RequestPhase.measured``). Each task gets its own calibrator, as each task run of the thesis
does.

Offline mode: ``calibrator=PATH`` loads a saved calibrator (its tokenizer fingerprint must match)
and every request is measured. Fit one from saved traces with
``python -m lmms_sd.calibration.collect`` then ``python -m lmms_sd.calibration.cli fit``.

Use::

    drafter, builder, session = make_calibrated(drafter, settings, tokenizer, vocab_size)
    session.plan({"task_a": 100, "task_b": 40})      # each task's request count, up front
    for each request of task t:
        phase = session.start_request(t, cfg.sampling)
        result = generate(target, prompt, cfg, drafter, builder, decode,
                          observer=session.observe)
        # count result.stats only when phase.measured
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from ..core.interfaces import Drafter
from ..core.sampling import SamplingConfig
from ..core.tree import DraftTree
from ..core.verify import Verdict
from ..trees.opt import OptConfig
from .calibrator import CalibratorConfig, GroupedIsotonicCalibrator, vocab_fingerprint
from .features import tokenizer_categories
from .recording import TraceObserver, TracingDrafter, with_attention_tap
from .steering import SteeredOptBuilder
from .traces import LABELS, TraceColumns, TraceRecord, write_traces

AUTO = "auto"


# The tree and label of each steering when not given: the thesis's topK_genrate defaults
# (nodes 500, threshold 0.2, max_depth 10, EAGLE's top_k 10 beam, for calibration requests too;
# soft labels even under greedy) and lmms_sd's earlier choice (OPT-Tree's 60 nodes, 0.5 while
# collecting, hard labels under greedy).
STEERING_DEFAULTS: dict[str, dict[str, Any]] = {
    "thesis": {"nodes": 500, "top_k": 10, "plain_threshold": 0.2, "label": "soft"},
    "replace": {"nodes": 60, "top_k": None, "plain_threshold": 0.5, "label": AUTO},
}


@dataclass(frozen=True)
class CalibratedSettings:
    """steering:          ``thesis`` (default: logit bias with the adaptive alpha) or ``replace``
                       (the score is the calibrated probability), see ``steering.py``; it
                       also sets the defaults of the fields left None (``STEERING_DEFAULTS``).
    nodes, max_depth:  OPT-Tree's node budget and depth cap, for both trees.
    top_k:             children per node and beam width (None under ``replace``: ``nodes``).
    threshold:         least gain in calibrated E[A] for a new layer (the thesis: 0.2).
    plain_threshold:   the same for the plain OPT-Tree of calibration requests.
    alpha:             the thesis's base alpha (its default 1), scaled by the adaptive factor.
    train_ratio:       share of each task's first requests that collect traces (online mode).
    calibrator:        a saved calibrator file: offline mode, every request measured.
    label:             the trace label to fit: soft | hard | target_prob, or auto = hard under
                       greedy decoding, target_prob under sampling (deterministic children).
    min_samples, attention_buckets, finer: the calibrator's grouping (``CalibratorConfig``).
    attention:         read the draft's image attention (a draft VLM must then be loaded with
                       attn_implementation='eager'; an MSD head reads its own); false uses 0
                       for every candidate.
    traces_out:        also append each task's calibration traces to this JSONL file."""

    steering: str = "thesis"
    nodes: int | None = None
    max_depth: int = 10
    top_k: int | None = None
    threshold: float = 0.2
    plain_threshold: float | None = None
    alpha: float = 1.0
    train_ratio: float = 0.2
    calibrator: str | None = None
    label: str | None = None
    min_samples: int = 200
    attention_buckets: int = 5
    finer: tuple[str, ...] = ()
    attention: bool = True
    traces_out: str | None = None

    def __post_init__(self) -> None:
        if self.steering not in STEERING_DEFAULTS:
            raise ValueError(f"steering must be one of {tuple(STEERING_DEFAULTS)}, got "
                             f"{self.steering!r}")
        for name, value in STEERING_DEFAULTS[self.steering].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.calibrator is None and not 0.0 < self.train_ratio < 1.0:
            raise ValueError(f"online calibration needs 0 < train_ratio < 1, got "
                             f"{self.train_ratio} (or pass calibrator=PATH)")
        if self.label != AUTO and self.label not in LABELS:
            raise ValueError(f"unknown label {self.label!r}; expected {AUTO!r} or one of {LABELS}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        _ = (self.opt_plain, self.opt_steered, self.calibrator_config)  # validates them now

    @property
    def opt_plain(self) -> OptConfig:
        return OptConfig(self.nodes, self.plain_threshold, self.max_depth, self.top_k)

    @property
    def opt_steered(self) -> OptConfig:
        return OptConfig(self.nodes, self.threshold, self.max_depth, self.top_k)

    @property
    def calibrator_config(self) -> CalibratorConfig:
        return CalibratorConfig(attention_buckets=self.attention_buckets,
                                min_samples=self.min_samples, finer=tuple(self.finer))

    def label_for(self, sampling: SamplingConfig) -> str:
        if self.label != AUTO:
            return self.label
        return "hard" if sampling.greedy else "target_prob"


@dataclass(frozen=True)
class RequestPhase:
    """What one request is: its task, its index among the task's requests, whether it counts in
    reported statistics, and whether it is decoded with the calibrated tree."""

    task: str
    index: int
    measured: bool
    calibrated: bool


class CalibrationSession:
    """Decides, request by request, which tree decodes it; collects traces; fits calibrators.
    Built by ``make_calibrated``; see the module docstring for the calling sequence."""

    def __init__(self, settings: CalibratedSettings, drafter: TracingDrafter,
                 builder: SteeredOptBuilder, categories: np.ndarray, fingerprint: str,
                 calibrator: GroupedIsotonicCalibrator | None = None) -> None:
        self.settings, self.drafter, self.builder = settings, drafter, builder
        self.categories, self.fingerprint, self.offline = categories, fingerprint, calibrator
        self.calibrators: dict[str, GroupedIsotonicCalibrator] = {}
        self.phases: list[RequestPhase] = []
        self._planned: dict[str, int] = {}
        self._seen: dict[str, int] = defaultdict(int)
        self._traces: dict[str, list[TraceRecord]] = defaultdict(list)
        self._observer: TraceObserver | None = None

    # ------------------------------------------------------------------ planning
    def plan(self, counts: Mapping[str, int]) -> None:
        """Announce how many requests each task has (needed for ``train_ratio``)."""
        for task, n in counts.items():
            if n < 1:
                raise ValueError(f"task {task!r}: need at least one request, got {n}")
            if task in self._planned and self._seen[task]:
                raise ValueError(f"task {task!r} is already being decoded; plan it once")
            self._planned[task] = int(n)

    def calibration_requests(self, task: str) -> int:
        """How many of ``task``'s first requests collect traces (0 in offline mode)."""
        if self.offline is not None:
            return 0
        if task not in self._planned:
            raise ValueError(f"task {task!r} was not planned: call plan() with every task's "
                             f"request count first (planned: {sorted(self._planned)})")
        return math.ceil(self.settings.train_ratio * self._planned[task])

    # ------------------------------------------------------------------ per request
    def start_request(self, task: str, sampling: SamplingConfig) -> RequestPhase:
        """Set up the drafter and builder for the next request of ``task``."""
        index = self._seen[task]
        n_train = self.calibration_requests(task)
        if self.offline is None and index >= self._planned[task]:
            raise ValueError(f"task {task!r}: request {index + 1} exceeds the "
                             f"{self._planned[task]} planned")
        self._seen[task] += 1
        collecting = index < n_train
        if collecting:
            calibrator = None
            self._observer = TraceObserver(self.drafter, self.categories, sampling)
        else:
            calibrator = self.offline or self.calibrators.get(task) or self.fit(task, sampling)
            self._observer = None
        self.builder.steer(calibrator)
        self.drafter.keep_logits = collecting
        phase = RequestPhase(task, index, measured=not collecting, calibrated=not collecting)
        self.phases.append(phase)
        return phase

    def observe(self, tree: DraftTree, target_logits: Tensor, verdict: Verdict) -> None:
        """The ``generate()`` observer: records traces during calibration requests only.

        target_logits: # [N+1, V] the verify forward's logits per slot"""
        if self._observer is not None:
            self._observer(tree, target_logits, verdict)
            self._traces[self.phases[-1].task] += self._observer.records
            self._observer.records = []

    # ------------------------------------------------------------------ fitting
    def traces(self, task: str) -> list[TraceRecord]:
        return list(self._traces[task])

    def fit(self, task: str, sampling: SamplingConfig) -> GroupedIsotonicCalibrator:
        """Fit ``task``'s calibrator on its traces (and append them to ``traces_out``)."""
        records = self._traces[task]
        if not records:
            raise ValueError(f"task {task!r}: its {self.calibration_requests(task)} calibration "
                             f"request(s) produced no draft candidates to fit a calibrator on")
        if self.settings.traces_out is not None:
            write_traces(self.settings.traces_out, records, self.fingerprint, append=True)
        label = self.settings.label_for(sampling)
        cols = TraceColumns.stack(records)
        cal = GroupedIsotonicCalibrator.fit(cols.features, cols.label(label), self.fingerprint,
                                            self.settings.calibrator_config, label)
        self.calibrators[task] = cal
        return cal

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per task: calibration and measured request counts, traces, fitted curves."""
        out: dict[str, dict[str, Any]] = {}
        for task in dict.fromkeys(p.task for p in self.phases):
            phases = [p for p in self.phases if p.task == task]
            cal = self.offline or self.calibrators.get(task)
            out[task] = {"calibration_requests": sum(not p.measured for p in phases),
                         "measured_requests": sum(p.measured for p in phases),
                         "traces": len(self._traces[task]),
                         "label": None if cal is None else cal.label,
                         "curves": None if cal is None else len(cal.curves)}
        return out


def make_calibrated(drafter: Drafter, settings: CalibratedSettings, tokenizer: Any,
                    vocab_size: int) -> tuple[TracingDrafter, SteeredOptBuilder,
                                              CalibrationSession]:
    """The drafter, tree builder and session of the Calibrated OPT-Tree.

    drafter:    any drafter; with ``settings.attention`` it must be a draft model (a draft VLM
                loaded with attn_implementation='eager', or a text-only LM: attention 0) or
                an MSD head (``MSDDrafter``, which reads its own attention)
    tokenizer:  the target's (``get_vocab()`` names calibrators, ``decode`` gives categories)
    vocab_size: the target's vocabulary size (rows of the logits)
    Pass the returned drafter and builder to ``generate`` together with
    ``observer=session.observe``, after ``session.start_request`` for each request.
    """
    fingerprint = vocab_fingerprint(tokenizer.get_vocab())
    categories = tokenizer_categories(tokenizer, vocab_size)
    tap = None
    if settings.attention:
        drafter, tap = with_attention_tap(drafter)
    tracing = TracingDrafter(drafter, tap)
    calibrator = None
    if settings.calibrator is not None:
        from ..adapters.hub import resolve_file  # a local file or ORG/NAME/FILE on the hub
        calibrator = GroupedIsotonicCalibrator.load(resolve_file(settings.calibrator), fingerprint)
    builder = SteeredOptBuilder(tracing, categories, settings.opt_plain, settings.opt_steered,
                                calibrator, settings.steering, settings.alpha)
    session = CalibrationSession(settings, tracing, builder, categories, fingerprint, calibrator)
    return tracing, builder, session

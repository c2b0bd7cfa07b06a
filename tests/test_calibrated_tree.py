"""Calibrated OPT-Tree end to end on the tiny models: recording (draft rows per slot, image
attention), steering, the online session, offline calibrator files, and the collect command.

Random tiny drafts are near-uniform, so greedy acceptance is rare; tests that need accepted
drafts use the scripted drafter (the target's own continuation for ``good`` tokens, then a wrong
one), and tests that need non-trivial calibrated trees fit the soft label, which random drafts
do produce.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmms_sd.adapters import HFAdapter, load_adapter
from lmms_sd.calibration.calibrator import GroupedIsotonicCalibrator, vocab_fingerprint
from lmms_sd.calibration.cli import main as cli_main
from lmms_sd.calibration.collect import collect_traces
from lmms_sd.calibration.collect import main as collect_main
from lmms_sd.calibration.compare import compare
from lmms_sd.calibration.features import tokenizer_categories
from lmms_sd.calibration.metrics import calibration_report
from lmms_sd.calibration.online import CalibratedSettings, make_calibrated
from lmms_sd.calibration.recording import AttentionTap, TraceObserver, TracingDrafter
from lmms_sd.calibration.traces import TraceColumns, TraceRecord, read_traces
from lmms_sd.core.generate import GenerationConfig, generate
from lmms_sd.core.interfaces import PromptInputs
from lmms_sd.core.sampling import SamplingConfig
from lmms_sd.drafters.model import ModelDrafter
from lmms_sd.testing.scripted import ScriptedDrafter
from lmms_sd.trees.opt import OptBuilder, OptConfig

MAX_NEW = 20
SMALL_OPT = OptConfig(nodes=8, threshold=0.0, max_depth=4)


@pytest.fixture(scope="module")
def eager_drafts(tiny_paths) -> dict[str, HFAdapter]:
    """The tiny draft VLMs with eager attention, so their image attention can be read."""
    return {family: load_adapter(paths["draft_vlm"], attn_implementation="eager")
            for family, paths in tiny_paths.items()}


@pytest.fixture(scope="module")
def references(tiny_adapters) -> dict[str, list[tuple[PromptInputs, list[int]]]]:
    from conftest import greedy_references

    return greedy_references(tiny_adapters, MAX_NEW)


@pytest.fixture(scope="module")
def tiny_traces(tiny_adapters, eager_drafts, references) -> dict[str, list[list[TraceRecord]]]:
    """Per family, the traces of each prompt decoded with the plain OPT-Tree and the draft VLM."""
    out = {}
    for family, adapters in tiny_adapters.items():
        target = adapters["target"]
        cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=target.eos_token_ids)
        cats = tokenizer_categories(target.tokenizer, target.vocab_size)
        out[family] = []
        for prompt, _ in references[family]:
            drafter = ModelDrafter(eager_drafts[family], vocab_size=target.vocab_size)
            records, _ = collect_traces(target, drafter, [prompt], cfg, SMALL_OPT, cats)
            out[family].append(records)
    return out


class Sharpened:
    """A drafter whose logits are the wrapped one's times ``scale``: a random tiny draft is
    near-uniform, so without this every plain OPT-Tree is one layer deep."""

    def __init__(self, inner: ModelDrafter, scale: float) -> None:
        self.inner, self.scale = inner, scale
        self.name, self.needs_target_hidden = "sharpened", False

    @property
    def forwards(self) -> int:
        return self.inner.forwards

    def begin(self, prompt: PromptInputs, target_prefill) -> None:
        self.inner.begin(prompt, target_prefill)

    def commit(self, tokens: list[int], hidden: torch.Tensor | None) -> None:
        self.inner.commit(tokens, hidden)

    def root(self) -> torch.Tensor:  # [V]
        return self.inner.root() * self.scale

    def expand(self, tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:  # [m, V]
        return self.inner.expand(tokens, parents) * self.scale


def config(target: HFAdapter) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=target.eos_token_ids)


# ---------------------------------------------------------------------- recording
def test_attention_tap_reads_image_mass_and_needs_eager(family: str, tiny_adapters,
                                                        eager_drafts, references) -> None:
    tap = AttentionTap(eager_drafts[family])
    image_prompt, text_prompt = references[family][0][0], references[family][3][0]
    assert image_prompt.image_mask.any() and not text_prompt.image_mask.any()
    tap.prefill(image_prompt)
    out = tap.forward(torch.tensor([5, 6]))
    assert out.attentions is None and tap.last_mass.shape == (2,)
    assert bool(((tap.last_mass > 0) & (tap.last_mass < 1)).all())
    tap.prefill(text_prompt)
    tap.forward(torch.tensor([5]))
    assert tap.last_mass.tolist() == [0.0]
    sdpa = SimpleNamespace(decoder=SimpleNamespace(config=SimpleNamespace(
        _attn_implementation="sdpa")))
    with pytest.raises(ValueError, match="eager"):
        AttentionTap(sdpa)


def test_slot_view_maps_tree_nodes_to_the_draft_rows_they_came_from(
        family: str, tiny_adapters, eager_drafts, references) -> None:
    """With draft probability as the score, a plain OPT-Tree node's score is the product of
    draft probabilities along its path: the recorded confidences must multiply to it."""
    target = tiny_adapters[family]["target"]
    prompt, _ = references[family][0]
    drafter = ModelDrafter(AttentionTap(eager_drafts[family]), vocab_size=target.vocab_size)
    tracing = TracingDrafter(Sharpened(drafter, 40.0), drafter.adapter)
    pre = target.prefill(prompt)
    tracing.begin(prompt, pre)
    tracing.commit([int(pre.logits[-1].argmax())], None)
    cfg = config(target)
    tree = OptBuilder(OptConfig(nodes=6, threshold=0.0, max_depth=3))(tracing, cfg.sampling)
    assert tree.depth >= 2 and len(tree) == 6
    probs, attention = tracing.slot_view(tree, cfg.sampling)
    slot = tree.parents + 1
    conf = probs[slot, tree.tokens].double()
    for i in range(len(tree)):
        path = torch.tensor(tree.path_to(i))
        assert float(conf[path].prod()) == pytest.approx(float(tree.scores[i]), rel=1e-4)
    expanded = tracing.expanded_ids(tree)
    for i, e in enumerate(expanded):  # slots never expanded have no row and no attention
        if e is None:
            assert float(probs[i + 1].sum()) == 0.0 and float(attention[i + 1]) == 0.0
        else:
            assert float(probs[i + 1].sum()) == pytest.approx(1.0, abs=1e-5)
    assert any(e is None for e in expanded) and any(e is not None for e in expanded)
    assert bool((attention[0] > 0) & (attention[0] < 1))


def test_traces_agree_with_the_verdict(family: str, tiny_adapters, references) -> None:
    """Greedy: every accepted node has hard label 1, and the records are the trees' nodes."""
    target = tiny_adapters[family]["target"]
    prompt, reference = references[family][0]
    tracing = TracingDrafter(ScriptedDrafter(reference, 3, target.vocab_size))
    cats = tokenizer_categories(target.tokenizer, target.vocab_size)
    observer = TraceObserver(tracing, cats, config(target).sampling)
    accepted: list[bool] = []

    def watch(tree, logits, verdict) -> None:
        observer(tree, logits, verdict)
        accepted.extend(i in verdict.accepted for i in range(len(tree)))

    result = generate(target, prompt, config(target), tracing, OptBuilder(SMALL_OPT),
                      target.decode, watch)
    assert result.tokens == reference
    assert len(observer.records) == len(accepted) == sum(s.tree_size for s in result.stats.steps)
    assert sum(accepted) > 0
    for rec, acc in zip(observer.records, accepted):
        if acc:
            assert rec.hard and rec.features.confidence == 1.0  # the scripted draft is one-hot
        assert rec.features.attention == 0.0  # a drafter without a tap reports no attention


# ---------------------------------------------------------------------- steering, losslessness
@pytest.mark.parametrize("steering", ["thesis", "replace"])
@pytest.mark.parametrize("kind", ["draft_vlm", "scripted"])
def test_calibrated_tree_greedy_equals_target(kind: str, steering: str, family: str,
                                              tiny_adapters, eager_drafts, references) -> None:
    target = tiny_adapters[family]["target"]
    settings = CalibratedSettings(steering, nodes=8, max_depth=4, threshold=0.05,
                                  plain_threshold=0.0, train_ratio=0.25, label="soft",
                                  min_samples=20, attention=kind == "draft_vlm")
    refs = references[family]
    if kind == "draft_vlm":
        inner = ModelDrafter(eager_drafts[family], vocab_size=target.vocab_size)
    else:
        inner = ScriptedDrafter(refs[0][1], 3, target.vocab_size)
    drafter, builder, session = make_calibrated(inner, settings, target.tokenizer,
                                                target.vocab_size)
    session.plan({"tiny": len(refs)})
    measured_steps = []
    for prompt, reference in refs:
        if kind == "scripted":
            inner.reference = reference  # the script of this prompt
        phase = session.start_request("tiny", config(target).sampling)
        assert builder.calibrated == phase.calibrated == phase.measured
        result = generate(target, prompt, config(target), drafter, builder, target.decode,
                          session.observe)
        assert result.tokens == reference, f"{kind} calibrated tree diverged ({phase})"
        if phase.measured:
            measured_steps += result.stats.steps
    assert [p.measured for p in session.phases] == [False, True, True, True]
    assert sum(s.tree_size for s in measured_steps) > 0  # the calibrated trees were verified
    if kind == "scripted":
        assert sum(s.accepted for s in measured_steps) > 0


def test_calibrator_changes_the_tree_and_its_expected_acceptance(
        tiny_adapters, eager_drafts, references, tiny_traces) -> None:
    """Steering is live: on the same draft state the calibrated tree differs from the plain one
    and its scores are calibrated path probabilities, not draft probabilities."""
    family = "llava"
    target = tiny_adapters[family]["target"]
    cols = TraceColumns.stack([r for recs in tiny_traces[family] for r in recs])
    cal = GroupedIsotonicCalibrator.fit(cols.features, cols.label("soft"), "fp", label="soft")
    prompt, _ = references[family][1]
    inner = ModelDrafter(eager_drafts[family], vocab_size=target.vocab_size)
    settings = CalibratedSettings("replace", nodes=8, max_depth=4, threshold=0.0,
                                  plain_threshold=0.0)
    drafter, builder, _ = make_calibrated(inner, settings, target.tokenizer, target.vocab_size)
    trees = []
    for calibrator in (None, cal):
        pre = target.prefill(prompt)
        drafter.begin(prompt, pre)
        drafter.commit([int(pre.logits[-1].argmax())], None)
        builder.steer(calibrator)
        trees.append(builder(drafter, config(target).sampling))
    plain, steered = trees
    assert plain.tokens.tolist() != steered.tokens.tolist() or \
        plain.parents.tolist() != steered.parents.tolist()
    # plain scores are draft path probabilities (tiny: near-uniform drafts); calibrated soft
    # acceptance is far higher, so the calibrated tree expects more accepted tokens
    assert steered.expected_accept > 2 * plain.expected_accept


# ---------------------------------------------------------------------- calibration quality
def test_calibrator_lowers_ece_on_held_out_tiny_traces(family: str, tiny_traces) -> None:
    train = TraceColumns.stack([r for recs in tiny_traces[family][:2] for r in recs])
    held = TraceColumns.stack([r for recs in tiny_traces[family][2:] for r in recs])
    assert len(train) > 200 and len(held) > 200
    assert held.features.attention.max() > 0  # the image attention feature is live
    for label in ("soft", "target_prob"):
        cal = GroupedIsotonicCalibrator.fit(train.features, train.label(label), "fp",
                                            label=label)
        rep = calibration_report(held.features.confidence, cal.predict(held.features),
                                 held.label(label))
        assert rep.ece_after < rep.ece_before, (label, rep)
        assert rep.brier_after < rep.brier_before, (label, rep)


# ---------------------------------------------------------------------- session, files
def test_session_plans_calibration_requests_per_task(tiny_adapters, references) -> None:
    target = tiny_adapters["llava"]["target"]
    prompt, reference = references["llava"][0]
    settings = CalibratedSettings("replace", nodes=4, max_depth=3, train_ratio=0.2,
                                  attention=False, min_samples=10)
    drafter, builder, session = make_calibrated(ScriptedDrafter(reference, 2, target.vocab_size),
                                                settings, target.tokenizer, target.vocab_size)
    session.plan({"a": 6, "b": 2})
    assert session.calibration_requests("a") == 2 and session.calibration_requests("b") == 1
    with pytest.raises(ValueError, match="not planned"):
        session.start_request("c", config(target).sampling)
    sampling = config(target).sampling
    phases = []
    for task in ["a", "a", "b", "a", "b"]:
        phases.append(session.start_request(task, sampling))
        generate(target, prompt, config(target), drafter, builder, target.decode,
                 session.observe)
    assert [(p.task, p.index, p.measured) for p in phases] == [
        ("a", 0, False), ("a", 1, False), ("b", 0, False), ("a", 2, True), ("b", 1, True)]
    assert set(session.calibrators) == {"a", "b"}
    assert session.calibrators["a"].label == "hard"  # auto under greedy decoding (replace)
    summary = session.summary()
    assert summary["a"]["calibration_requests"] == 2 and summary["a"]["measured_requests"] == 1
    assert summary["a"]["traces"] == len(session.traces("a")) > 0
    with pytest.raises(ValueError, match="exceeds"):
        session.start_request("b", sampling)
    session.plan({"empty": 2})
    session.start_request("empty", sampling)  # a calibration request that decodes nothing
    with pytest.raises(ValueError, match="no draft candidates"):
        session.start_request("empty", sampling)
    with pytest.raises(ValueError, match="train_ratio"):
        CalibratedSettings(train_ratio=0.0)
    with pytest.raises(ValueError, match="label"):
        CalibratedSettings(label="sometimes")


def test_sampled_decoding_fits_the_target_prob_label(tiny_adapters, references) -> None:
    """Under sampling the tree's children are still deterministic, so auto picks the
    target_prob label; the calibrated tree then decodes with stochastic verification."""
    target = tiny_adapters["qwen2_vl"]["target"]
    prompt, reference = references["qwen2_vl"][2]
    settings = CalibratedSettings("replace", nodes=4, max_depth=3, train_ratio=0.5,
                                  attention=False, min_samples=10)
    drafter, builder, session = make_calibrated(ScriptedDrafter(reference, 2, target.vocab_size),
                                                settings, target.tokenizer, target.vocab_size)
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, eos_token_ids=target.eos_token_ids,
                           sampling=SamplingConfig(temperature=0.7), seed=3)
    session.plan({"s": 2})
    for _ in range(2):
        phase = session.start_request("s", cfg.sampling)
        result = generate(target, prompt, cfg, drafter, builder, target.decode, session.observe)
        assert 1 <= len(result.tokens) <= MAX_NEW
    assert phase.calibrated and session.calibrators["s"].label == "target_prob"
    assert all(0.0 <= r.target_prob <= 1.0 for r in session.traces("s"))


def test_offline_calibrator_round_trip_and_guards(tiny_adapters, eager_drafts, tiny_traces,
                                                  tmp_path: Path) -> None:
    family = "qwen2_vl"
    target = tiny_adapters[family]["target"]
    fp = vocab_fingerprint(target.tokenizer.get_vocab())
    cols = TraceColumns.stack([r for recs in tiny_traces[family] for r in recs])
    cal = GroupedIsotonicCalibrator.fit(cols.features, cols.label("soft"), fp, label="soft")
    path = tmp_path / "cal.json"
    cal.save(path)
    inner = ModelDrafter(eager_drafts[family], vocab_size=target.vocab_size)
    settings = CalibratedSettings(calibrator=str(path), train_ratio=0.0)
    _, builder, session = make_calibrated(inner, settings, target.tokenizer, target.vocab_size)
    assert builder.calibrated
    np.testing.assert_array_equal(builder.calibrator.predict(cols.features),
                                  cal.predict(cols.features))
    phase = session.start_request("any task", config(target).sampling)  # no plan needed
    assert phase.measured and phase.calibrated
    other = GroupedIsotonicCalibrator.fit(cols.features, cols.label("soft"), "sha256:other",
                                          label="soft")
    other.save(tmp_path / "other.json")
    with pytest.raises(ValueError, match="fitted for tokenizer 'sha256:other'"):
        make_calibrated(inner, CalibratedSettings(calibrator=str(tmp_path / "other.json")),
                        target.tokenizer, target.vocab_size)
    (tmp_path / "foreign.json").write_text(json.dumps({"format": "pickle?", "version": 7}))
    with pytest.raises(ValueError, match="unsupported calibrator file"):
        make_calibrated(inner, CalibratedSettings(calibrator=str(tmp_path / "foreign.json")),
                        target.tokenizer, target.vocab_size)


def test_make_calibrated_names_a_drafter_without_attention(tiny_adapters, references) -> None:
    target = tiny_adapters["llava"]["target"]
    scripted = ScriptedDrafter(references["llava"][0][1], 1, target.vocab_size)
    with pytest.raises(ValueError, match="scripted_1.*attention=false"):
        make_calibrated(scripted, CalibratedSettings(), target.tokenizer, target.vocab_size)


def test_collect_command_then_fit(tiny_paths, tiny_adapters, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    paths = tiny_paths["llava"]
    out = tmp_path / "traces.jsonl"
    assert collect_main(["--target", str(paths["target"]), "--draft", str(paths["draft_vlm"]),
                         "--items", "2", "--out", str(out), "--nodes", "6", "--max-depth", "3",
                         "--threshold", "0", "--max-new-tokens", "8"]) == 0
    fp, records = read_traces([out])
    assert fp == vocab_fingerprint(tiny_adapters["llava"]["target"].tokenizer.get_vocab())
    assert len(records) > 12 and max(r.features.attention for r in records) > 0
    assert cli_main(["fit", "--traces", str(out), "--out", str(tmp_path / "c.json"),
                     "--min-samples", "10", "--holdout", "0.5"]) == 0
    assert "held-out" in capsys.readouterr().out


def test_compare_reports_both_trees_at_the_same_budget(tiny_adapters, eager_drafts,
                                                       references) -> None:
    family = "qwen2_vl"
    target = tiny_adapters[family]["target"]
    prompts = [p for p, _ in references[family][:3]]
    cfg = GenerationConfig(max_new_tokens=8, eos_token_ids=target.eos_token_ids)
    settings = CalibratedSettings(nodes=6, max_depth=3, label="soft", min_samples=20)
    result = compare(target, ModelDrafter(eager_drafts[family], vocab_size=target.vocab_size),
                     prompts, cfg, settings)
    assert result["measured_items"] == 2 and len(result["trees"]) == 3
    assert all(t["tree_size"] <= 6 and t["tau"] >= 1.0 for t in result["trees"])
    assert result["held_out_ece"]["n"] > 0


def test_collect_command_with_an_msd_head(tiny_paths, tiny_adapters, tmp_path: Path) -> None:
    """``--head``: traces of the head *_msd_calibrated steers; it reports no attention (0)."""
    from lmms_sd.drafters.msd_format import new_msd_head, save_msd_head

    paths, target = tiny_paths["qwen2_vl"], tiny_adapters["qwen2_vl"]["target"]
    torch.manual_seed(0)
    save_msd_head(new_msd_head(target.model), tmp_path / "head")
    out = tmp_path / "traces.jsonl"
    assert collect_main(["--target", str(paths["target"]), "--head", str(tmp_path / "head"),
                         "--items", "2", "--out", str(out), "--nodes", "6", "--max-depth", "3",
                         "--threshold", "0", "--max-new-tokens", "8"]) == 0
    _, records = read_traces([out])
    assert len(records) > 12 and all(r.features.attention == 0 for r in records)
    with pytest.raises(SystemExit):  # a draft model and a head at once
        collect_main(["--target", str(paths["target"]), "--head", str(tmp_path / "head"),
                      "--draft", str(paths["draft_vlm"]), "--items", "1", "--out", str(out)])

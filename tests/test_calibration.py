"""Acceptance calibrator: features, traces, grouped isotonic fit with fallback, JSON, metrics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.isotonic import IsotonicRegression

from lmms_sd.calibration.calibrator import (CalibratorConfig, GroupedIsotonicCalibrator,
                                            vocab_fingerprint)
from lmms_sd.calibration.cli import main as cli_main
from lmms_sd.calibration.features import (CONTENT, FUNCTION, NUMBER, CandidateFeatures,
                                          FeatureArrays, bucketize, category_table,
                                          image_attention_mass, quantile_edges, token_category)
from lmms_sd.calibration.metrics import (brier_score, calibration_report,
                                         expected_calibration_error)
from lmms_sd.calibration.traces import (TraceColumns, TraceRecord, read_traces,
                                        records_from_tree, write_traces)
from lmms_sd.core.tree import DraftTree

FP = "sha256:test-tokenizer"


# ---------------------------------------------------------------------- synthetic traces
def true_acceptance(conf: np.ndarray, cat: np.ndarray, attn: np.ndarray) -> np.ndarray:
    """Content words are over-confident, more so when they look at the image; function words
    under-confident; numbers calibrated."""
    power = np.where(cat == CONTENT, 1.5 + 2.0 * attn, np.where(cat == FUNCTION, 0.5, 1.0))
    return conf ** power


def synthetic(n: int, seed: int, cat_p: tuple[float, float, float] = (0.55, 0.35, 0.10)
              ) -> tuple[FeatureArrays, np.ndarray]:
    """Features and hard (Bernoulli) labels drawn from ``true_acceptance``."""
    rng = np.random.default_rng(seed)
    cat = rng.choice(3, size=n, p=cat_p)
    conf = rng.beta(2.0, 1.5, size=n)
    attn = rng.beta(1.5, 3.0, size=n)
    depth = rng.integers(1, 7, size=n)
    margin = conf * rng.random(n)
    label = (rng.random(n) < true_acceptance(conf, cat, attn)).astype(np.float64)
    return FeatureArrays(conf, cat.astype(np.int64), attn, depth.astype(np.int64), margin), label


@pytest.fixture(scope="module")
def data() -> tuple[FeatureArrays, np.ndarray, FeatureArrays, np.ndarray]:
    train_f, train_y = synthetic(30000, seed=0)
    test_f, test_y = synthetic(20000, seed=1)
    return train_f, train_y, test_f, test_y


@pytest.fixture(scope="module")
def fitted(data) -> GroupedIsotonicCalibrator:
    train_f, train_y, _, _ = data
    return GroupedIsotonicCalibrator.fit(train_f, train_y, FP, CalibratorConfig(), label="hard")


FINE = CalibratorConfig(finer=("depth", "margin"), min_samples=300)


@pytest.fixture(scope="module")
def fitted_fine(data) -> GroupedIsotonicCalibrator:
    """Level 3 = category x attention x depth bucket x margin bucket."""
    train_f, train_y, _, _ = data
    return GroupedIsotonicCalibrator.fit(train_f, train_y, FP, FINE, label="hard")


# ---------------------------------------------------------------------- features
@pytest.mark.parametrize("text, category", [
    (" the", "function"), (",", "function"), (" 42", "number"), (" circle", "content"),
    ("The", "function"), ("\n", "function"), ("", "function"), ("</s>", "function"),
    ("<|im_end|>", "function"), (" 3.14", "number"), ("1,000", "number"), (" 50%", "number"),
    (" three", "number"), ("\u0120of", "function"), ("\u2581red", "content"), (" n't", "function"),
    (" Paris", "content"), (" ...", "function"), ("7", "number"), (" 7th", "content"),
])
def test_token_category(text: str, category: str) -> None:
    assert token_category(text) == category


def test_category_table_indexes_by_token_id() -> None:
    vocab = [" the", " circle", " 42", "."]
    table = category_table(lambda i: vocab[i], len(vocab))
    assert table.tolist() == [FUNCTION, CONTENT, NUMBER, FUNCTION]


def test_candidate_features_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="category"):
        CandidateFeatures(0.5, "verb", 0.1, 1, 0.2)
    with pytest.raises(ValueError, match="attention"):
        CandidateFeatures(0.5, "content", 1.5, 1, 0.2)
    with pytest.raises(ValueError, match="depth"):
        CandidateFeatures(0.5, "content", 0.1, 0, 0.2)


def test_quantile_buckets_split_evenly_and_reuse_learned_edges() -> None:
    values = np.arange(100) / 100.0
    edges = quantile_edges(values, 5)
    assert len(edges) == 4
    assert np.bincount(bucketize(values, edges)).tolist() == [20] * 5
    # unseen values use the stored edges; beyond the ends they land in the outer buckets
    assert bucketize(np.array([-1.0, 0.0, 2.0]), edges).tolist() == [0, 0, 4]


def test_image_attention_mass_sums_image_keys() -> None:
    attn = torch.tensor([[0.1, 0.2, 0.3, 0.0, 0.4, 0.0],     # [Q=2, S=6]
                         [0.0, 0.5, 0.0, 0.25, 0.0, 0.25]])
    image_mask = torch.tensor([False, True, True, False])     # prompt of 4, images at 1, 2
    torch.testing.assert_close(image_attention_mass(attn, image_mask), torch.tensor([0.5, 0.5]))


# ---------------------------------------------------------------------- traces
def small_tree() -> tuple[DraftTree, torch.Tensor, torch.Tensor, torch.Tensor]:
    """root -> node0 (tok 1), node1 (tok 2); node0 -> node2 (tok 3). V = 5."""
    tree = DraftTree(torch.tensor([1, 2, 3]), torch.tensor([-1, -1, 0]))
    draft = torch.tensor([[0.1, 0.5, 0.3, 0.05, 0.05],      # slot 0: root
                          [0.1, 0.1, 0.1, 0.6, 0.1],        # slot 1: node0
                          [0.2] * 5, [0.2] * 5])
    target = torch.tensor([[0.05, 0.25, 0.6, 0.05, 0.05],   # argmax 2: node1 would be accepted
                           [0.0, 0.0, 0.1, 0.9, 0.0],       # argmax 3: node2 too
                           [0.2] * 5, [0.2] * 5])
    attention = torch.tensor([0.7, 0.2, 0.0, 0.0])          # draft's image mass per slot
    return tree, target, draft, attention


def test_records_label_every_node_from_its_parent_slot() -> None:
    tree, target, draft, attention = small_tree()
    table = np.array([CONTENT, FUNCTION, NUMBER, CONTENT, CONTENT], dtype=np.int8)
    recs = records_from_tree(tree, target, draft, table, attention)
    assert [r.token for r in recs] == [1, 2, 3]
    n0, n1, n2 = recs
    # node0: q=0.5, p=0.25 -> soft 0.5, rejected by greedy; it hangs from the root (slot 0)
    assert n0.soft == pytest.approx(0.5) and n0.hard is False
    assert n0.target_prob == pytest.approx(0.25)
    assert n0.features.confidence == pytest.approx(0.5) and n0.features.depth == 1
    assert n0.features.attention == pytest.approx(0.7)
    assert n0.features.margin == pytest.approx(0.2) and n0.features.category == "function"
    # node1: q=0.3, p=0.6 -> soft clipped to 1, greedy accepts
    assert n1.soft == 1.0 and n1.hard is True and n1.features.category == "number"
    # node2: labelled from node0's slot although node0 itself was rejected
    assert n2.soft == 1.0 and n2.hard is True and n2.features.depth == 2
    assert n2.features.attention == pytest.approx(0.2) and n2.features.margin == pytest.approx(0.5)


def test_records_reject_a_node_the_draft_could_not_have_drawn() -> None:
    tree, target, draft, _ = small_tree()
    draft[0, 2] = 0.0
    with pytest.raises(ValueError, match="node 1"):
        records_from_tree(tree, target, draft, np.zeros(5, dtype=np.int8))


def test_traces_jsonl_round_trip_and_fingerprint_guard(tmp_path: Path) -> None:
    tree, target, draft, attention = small_tree()
    recs = records_from_tree(tree, target, draft, np.zeros(5, dtype=np.int8), attention)
    path = tmp_path / "t.jsonl"
    write_traces(path, recs[:2], FP)
    write_traces(path, recs[2:], FP, append=True)
    fp, back = read_traces([path])
    assert fp == FP and back == recs
    with pytest.raises(ValueError, match="tokenizer"):
        write_traces(path, recs, "sha256:other", append=True)
    other = tmp_path / "o.jsonl"
    write_traces(other, recs, "sha256:other")
    with pytest.raises(ValueError, match="different tokenizers"):
        read_traces([path, other])


# ---------------------------------------------------------------------- calibrator
def test_calibration_lowers_ece_and_brier_on_held_out_traces(data, fitted) -> None:
    _, _, test_f, test_y = data
    pred = fitted.predict(test_f)
    rep = calibration_report(test_f.confidence, pred, test_y)
    assert rep.ece_after < 0.5 * rep.ece_before
    assert rep.brier_after < rep.brier_before - 0.01
    for cat in (CONTENT, FUNCTION):  # within a category the raw confidence is far off
        m = test_f.category == cat
        rep = calibration_report(test_f.confidence[m], pred[m], test_y[m])
        assert rep.ece_before > 0.1 and rep.ece_after < 0.3 * rep.ece_before


def test_groups_beat_one_global_curve(data, fitted) -> None:
    train_f, train_y, test_f, test_y = data
    global_only = GroupedIsotonicCalibrator.fit(
        train_f, train_y, FP, CalibratorConfig(min_samples=len(train_y) + 1), label="hard")
    assert set(global_only.curves) == {"global"}
    assert brier_score(fitted.predict(test_f), test_y) < \
        brier_score(global_only.predict(test_f), test_y) - 0.002


def test_sparse_groups_fall_back_to_coarser_level() -> None:
    # content ~ 8000 (level-2 groups of ~1600), function ~ 600 (level-2 groups of ~120 < 200),
    # number ~ 60 (< 200 even at level 1)
    feats, labels = synthetic(8660, seed=3, cat_p=(8000 / 8660, 600 / 8660, 60 / 8660))
    cal = GroupedIsotonicCalibrator.fit(feats, labels, FP, CalibratorConfig(min_samples=200))
    used = cal.groups_used(feats)
    cat = feats.category
    assert all(k.startswith("content/a") for k in used[cat == CONTENT])
    assert set(used[cat == FUNCTION]) == {"function"}
    assert set(used[cat == NUMBER]) == {"global"}
    assert "function/a0" not in cal.curves and cal.group_counts["function/a0"] < 200
    pred = cal.predict(feats)
    fn = cat == FUNCTION
    np.testing.assert_array_equal(pred[fn], cal.curves["function"](feats.confidence[fn]))
    nb = cat == NUMBER
    np.testing.assert_array_equal(pred[nb], cal.curves["global"](feats.confidence[nb]))


def test_curves_match_sklearn_isotonic_predictions(data, fitted) -> None:
    train_f, train_y, test_f, _ = data
    edges = quantile_edges(train_f.attention, 5)
    key_train = (train_f.category == CONTENT) & (bucketize(train_f.attention, edges) == 3)
    key_test = (test_f.category == CONTENT) & (bucketize(test_f.attention, edges) == 3)
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1)
    iso.fit(train_f.confidence[key_train], train_y[key_train])
    probe = np.concatenate([test_f.confidence[key_test], [-0.5, 0.0, 1.0, 1.5]])
    np.testing.assert_array_equal(fitted.curves["content/a3"](probe), iso.predict(probe))
    np.testing.assert_array_equal(fitted.predict(test_f)[key_test],
                                  iso.predict(test_f.confidence[key_test]))


def test_level3_json_round_trip_gives_identical_predictions(data, fitted_fine,
                                                            tmp_path: Path) -> None:
    _, _, test_f, _ = data
    cal = fitted_fine
    assert any(k.count("/") == 3 for k in cal.curves)        # e.g. "content/a2/d1/m0"
    path = tmp_path / "cal.json"
    cal.save(path)
    back = GroupedIsotonicCalibrator.load(path, FP)
    assert back.config == FINE and back.label == "hard"
    np.testing.assert_array_equal(back.predict(test_f), cal.predict(test_f))
    np.testing.assert_array_equal(back.groups_used(test_f), cal.groups_used(test_f))


def test_predict_arrays_accepts_tensors_and_names_missing_columns(data, fitted) -> None:
    _, _, test_f, _ = data
    out = fitted.predict_arrays(torch.from_numpy(test_f.confidence),
                                torch.from_numpy(test_f.category),
                                torch.from_numpy(test_f.attention))
    np.testing.assert_array_equal(out, fitted.predict(test_f))
    recs = [CandidateFeatures(float(c), "content", float(a), 1, 0.0)
            for c, a in zip(test_f.confidence[:5], test_f.attention[:5])]
    np.testing.assert_array_equal(
        fitted.predict(recs), fitted.predict_arrays(test_f.confidence[:5], [CONTENT] * 5,
                                                    test_f.attention[:5]))
    finer = GroupedIsotonicCalibrator(
        CalibratorConfig(finer=("depth",)), FP, "soft", fitted.edges, fitted.curves, {})
    with pytest.raises(ValueError, match="depth"):
        finer.predict_arrays(test_f.confidence, test_f.category, test_f.attention)


def test_load_rejects_unknown_format_version_and_other_tokenizer(fitted, tmp_path: Path) -> None:
    path = tmp_path / "cal.json"
    fitted.save(path)
    with pytest.raises(ValueError, match="tokenizer"):
        GroupedIsotonicCalibrator.load(path, "sha256:someone-else")
    for field, value in (("format", "pickle"), ("version", 99)):
        obj = json.loads(path.read_text())
        obj[field] = value
        with pytest.raises(ValueError, match="unsupported calibrator file"):
            GroupedIsotonicCalibrator.from_json(obj, FP)


def test_vocab_fingerprint_tells_vocabularies_apart() -> None:
    a = vocab_fingerprint({"a": 0, "b": 1})
    assert a == vocab_fingerprint({"b": 1, "a": 0})
    assert a != vocab_fingerprint({"a": 1, "b": 0})


# ---------------------------------------------------------------------- metrics
def test_ece_and_brier_on_hand_cases() -> None:
    # every prediction 0.3 and exactly 30% accepted: perfectly calibrated
    pred, label = np.full(10, 0.3), np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0.0])
    assert expected_calibration_error(pred, label) == pytest.approx(0.0)
    assert brier_score(pred, label) == pytest.approx(0.21)
    # two bins: 0.95 vs 50% accepted (gap 0.45), 0.05 vs 0% accepted (gap 0.05), equal weight
    pred = np.array([0.95, 0.95, 0.05, 0.05])
    label = np.array([1.0, 0.0, 0.0, 0.0])
    assert expected_calibration_error(pred, label) == pytest.approx(0.25)
    assert expected_calibration_error(np.ones(3), np.zeros(3)) == pytest.approx(1.0)


# ---------------------------------------------------------------------- CLI and plot
def test_cli_fit_and_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    feats, labels = synthetic(3000, seed=5)
    names = ("content", "function", "number")
    recs = [TraceRecord(0, CandidateFeatures(float(c), names[k], float(a), int(d), float(m)),
                        float(y), bool(y), float(y))
            for c, k, a, d, m, y in zip(feats.confidence, feats.category, feats.attention,
                                        feats.depth, feats.margin, labels)]
    traces, out, plot = tmp_path / "t.jsonl", tmp_path / "c.json", tmp_path / "r.png"
    write_traces(traces, recs, FP)
    assert cli_main(["fit", "--traces", str(traces), "--out", str(out), "--label", "hard",
                     "--holdout", "0.25"]) == 0
    cal = GroupedIsotonicCalibrator.load(out, FP)
    assert cal.label == "hard" and cal.group_counts["global"] == 2250
    assert cli_main(["evaluate", "--calibrator", str(out), "--traces", str(traces),
                     "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "held-out" in printed and "ECE" in printed and "Brier" in printed
    assert plot.read_bytes()[:4] == b"\x89PNG"
    cols = TraceColumns.stack(recs)
    np.testing.assert_array_equal(cols.label("hard"), labels)


def test_predict_children_matches_per_candidate_predict(fitted_fine) -> None:
    # 2 parent nodes x 3 children over V = 6; categories by token id
    table = np.array([CONTENT, FUNCTION, NUMBER, CONTENT, FUNCTION, CONTENT], dtype=np.int8)
    dists = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05],
                          [0.05, 0.05, 0.3, 0.3, 0.2, 0.1]])
    tokens = torch.tensor([[0, 1, 2], [2, 3, 4]])
    probs = torch.gather(dists, 1, tokens)
    attention = torch.tensor([0.05, 0.6])
    got = fitted_fine.predict_children(probs, tokens, dists, 3, table, attention)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    names = ("content", "function", "number")
    margins = [float(d[0] - d[1]) for d in torch.sort(dists, descending=True).values]
    want = fitted_fine.predict([
        CandidateFeatures(float(probs[i, j]), names[table[int(tokens[i, j])]],
                          float(attention[i]), 3, margins[i])
        for i in range(2) for j in range(3)])
    np.testing.assert_allclose(got.numpy().reshape(-1), want, rtol=1e-6)

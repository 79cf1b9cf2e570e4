"""The drift detectors on synthetic samples with known answers, and the retraining decision."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from pipeline.config import DriftConfig
from pipeline.monitoring import detectors as drift
from pipeline.monitoring.policy import retrain_decision


def test_alpha_shares_split_the_level_by_weight():
    shares = drift.alpha_shares({"a": 1.0, "b": 3.0}, 0.04)
    assert shares == pytest.approx({"a": 0.01, "b": 0.03})
    with pytest.raises(ValueError, match="weight"):
        drift.alpha_shares({"a": 0.0}, 0.05)


def test_holm_matches_the_step_down_definition():
    p = [0.01, 0.04, 0.03, 0.5]
    # sorted: 0.01*4=0.04, 0.03*3=0.09, 0.04*2=0.08 -> monotone 0.09, 0.5*1=0.5
    assert drift.holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.5])


def test_feature_tests_flag_only_the_shifted_feature():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(400, 3))
    batch = rng.normal(size=(100, 3))
    batch[:, 1] += 1.0
    result = drift.feature_tests("stats", reference, batch, ["a", "b", "c"], alpha=0.01)
    assert result.drift
    assert result.features["b"]["p_adjusted"] < 0.01
    assert result.features["a"]["p_adjusted"] > 0.01 and result.features["c"]["p_adjusted"] > 0.01
    assert "b" in result.detail


def test_feature_tests_on_identical_constants_is_no_drift_but_a_changed_constant_is():
    same = drift.feature_tests("s", np.full((50, 1), 8.0), np.full((20, 1), 8.0), ["width"], 0.01)
    assert not same.drift and same.p_value == 1.0
    changed = drift.feature_tests("s", np.full((50, 1), 8.0), np.full((20, 1), 16.0), ["width"], 0.01)
    assert changed.drift


def test_cramer_von_mises_option_detects_a_shift():
    rng = np.random.default_rng(1)
    result = drift.feature_tests(
        "s", rng.normal(size=(300, 1)), rng.normal(0.8, 1, size=(80, 1)), ["x"], 0.01, test="cvm"
    )
    assert result.drift and "CVM" in result.detail


def test_mmd_statistic_is_the_biased_mmd_squared():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(30, 4)), rng.normal(0.5, 1, size=(20, 4))
    result = drift.mmd_test("mmd", x, y, alpha=0.05, permutations=100, seed=0)
    pooled = np.vstack([x, y])
    distances = cdist(pooled, pooled, "sqeuclidean")  # not the module's own squared_distances
    bandwidth = np.median(distances[np.triu_indices(50, k=1)])
    k = np.exp(-distances / (2 * bandwidth))
    expected = k[:30, :30].mean() + k[30:, 30:].mean() - 2 * k[:30, 30:].mean()
    assert result.statistic == pytest.approx(expected, rel=1e-4)


def test_mmd_permutation_test_holds_its_level_and_has_power():
    rng = np.random.default_rng(3)
    null_p = [
        drift.mmd_test("mmd", rng.normal(size=(80, 5)), rng.normal(size=(40, 5)), 0.05, 200, seed).p_value
        for seed in range(60)
    ]
    assert np.mean(np.array(null_p) < 0.05) <= 0.12  # nominal 0.05; binomial slack for 60 draws
    shifted = drift.mmd_test("mmd", rng.normal(size=(80, 5)), rng.normal(0.7, 1, size=(40, 5)), 0.05, 200, 0)
    assert shifted.drift and shifted.p_value <= 1 / 201 + 1e-12


def test_label_shift_test_detects_a_prior_shift_and_counts_unseen_classes():
    reference = [str(i % 4) for i in range(400)]
    same = drift.label_shift_test("labels", reference, [str(i % 4) for i in range(100)], 0.01)
    assert not same.drift and same.p_value > 0.5
    skewed = ["0"] * 60 + ["1"] * 20 + ["2"] * 10 + ["3"] * 10
    assert drift.label_shift_test("labels", reference, skewed, 0.01).drift
    novel = drift.label_shift_test("labels", reference, ["0"] * 50 + ["9"] * 50, 0.01)
    assert novel.drift and novel.features["9"] == {"reference": 0.0, "batch": 50.0}


def test_accuracy_test_needs_significance_and_a_large_enough_drop():
    ok = drift.accuracy_test("acc", np.array([True] * 97 + [False] * 3), 0.98, 0.01, 0.05)
    assert not ok.drift
    bad = drift.accuracy_test("acc", np.array([True] * 70 + [False] * 30), 0.98, 0.01, 0.05)
    assert bad.drift and bad.statistic == pytest.approx(0.70)
    small_drop = drift.accuracy_test("acc", np.array([True] * 940 + [False] * 60), 0.98, 0.01, 0.05)
    assert small_drop.p_value < 0.01 and not small_drop.drift  # significant, but only 0.04 lower


NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)
CFG = DriftConfig(cooldown_hours=24, max_model_age_days=30)


def test_retrain_on_drift_outside_the_cooldown():
    decision = retrain_decision(1, NOW - timedelta(days=2), NOW - timedelta(days=2), NOW, CFG)
    assert decision.retrain and "drift" in decision.reason


def test_cooldown_defers_retraining_on_drift():
    decision = retrain_decision(2, NOW - timedelta(days=40), NOW - timedelta(hours=3), NOW, CFG)
    assert not decision.retrain and decision.deferred and "cooldown" in decision.reason


def test_an_old_champion_is_retrained_without_drift():
    decision = retrain_decision(0, NOW - timedelta(days=31), NOW - timedelta(days=31), NOW, CFG)
    assert decision.retrain and "days old" in decision.reason


def test_no_drift_and_a_fresh_champion_means_no_training():
    decision = retrain_decision(0, NOW - timedelta(days=3), None, NOW, CFG)
    assert not decision.retrain and not decision.deferred


def test_accuracy_test_allows_for_a_small_test_split_measured_at_one():
    # 24/24 on the test split is an estimate, not a certainty: two misses in 24 are not drift...
    two_misses = np.array([True] * 22 + [False] * 2)
    assert not drift.accuracy_test("acc", two_misses, 1.0, 0.01, 0.05, reference_images=24).drift
    assert drift.accuracy_test("acc", two_misses, 1.0, 0.01, 0.05).drift  # as the exact-reference test had it
    # ...while half the batch wrong is, even against so small a test split.
    half = np.array([True] * 12 + [False] * 12)
    assert drift.accuracy_test("acc", half, 1.0, 0.01, 0.05, reference_images=24).drift

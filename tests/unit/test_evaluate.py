import numpy as np
import pytest

from pipeline.evaluate import classification_metrics, expected_calibration_error


def test_ece_is_zero_when_confidence_matches_accuracy():
    # 10 predictions at confidence 0.8, 8 of them right: perfectly calibrated
    probabilities = np.tile([0.8, 0.2], (10, 1))
    labels = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(probabilities, labels, bins=10) == pytest.approx(0.0)


def test_ece_measures_overconfidence():
    probabilities = np.tile([0.99, 0.01], (10, 1))
    labels = np.array([0] * 5 + [1] * 5)  # 50% right at 99% confidence
    assert expected_calibration_error(probabilities, labels, bins=15) == pytest.approx(0.49)


def test_classification_metrics_per_class_and_top_k():
    names = ["a", "b", "c", "d"]
    labels = np.array([0, 1, 2, 3])
    probabilities = np.array(
        [
            [0.7, 0.1, 0.1, 0.1],  # right
            [0.6, 0.3, 0.05, 0.05],  # wrong, true class second
            [0.1, 0.1, 0.7, 0.1],  # right
            [0.1, 0.1, 0.5, 0.3],  # wrong, true class second
        ]
    )
    metrics = classification_metrics(labels, probabilities, names, top_k=2, bins=5)
    assert metrics["accuracy"] == 0.5
    assert metrics["top_2_accuracy"] == 1.0
    assert metrics["per_class"]["b"]["recall"] == 0.0
    assert metrics["per_class"]["c"]["precision"] == 0.5
    assert metrics["per_class"]["a"]["support"] == 1
    # F1 per class: a and c 2/3 (precision 1/2, recall 1), b and d 0 (never predicted right)
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0 + 2 / 3 + 0) / 4)

"""The robustness stage: FGSM and common corruptions on the small CNN of the session fixture.

The stage runs once on the trained project; its report is checked against an
accuracy computed here independently, and its pure parts (corruptions, the FGSM
step, the report look-up, the stratified subset) are tested on their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import pytest
from PIL import Image

from pipeline import robustness
from pipeline.artifacts import image_files, load_trained_model, read_split
from pipeline.images import load_files
from pipeline.inference import predict
from tests.model.conftest import Project, local_tracking

pytestmark = pytest.mark.slow

CORRUPTIONS = ["gaussian_noise", "blur", "brightness", "contrast", "jpeg"]
ONE_IMAGE = 1 / 24  # one test image of the fixture's 24, the tolerance of "non-increasing"


@dataclass(frozen=True)
class Measured:
    project: Project
    report: dict[str, Any]
    model: Any
    images: np.ndarray
    labels: np.ndarray
    clean_accuracy: float  # computed here, as evaluate does


@pytest.fixture(scope="module")
def measured(trained_project: Project) -> Measured:
    cfg, paths = trained_project.cfg, trained_project.paths
    with local_tracking():
        report = robustness.run(cfg, paths)
    model, names = load_trained_model(paths)
    test = read_split(paths, "test")
    images = load_files(image_files(test, paths.root), cfg.train.image_size)
    labels = np.array([names.index(label) for label in test["label"]])
    clean = float((predict(model, images).argmax(axis=1) == labels).mean())
    return Measured(trained_project, report, model, images, labels, clean)


def test_the_report_covers_every_epsilon_and_corruption(measured: Measured) -> None:
    cfg, paths = measured.project.cfg, measured.project.paths
    assert cfg.robustness.epsilons == [0.0, 0.01, 0.03, 0.1]
    assert list(cfg.robustness.corruptions) == CORRUPTIONS
    on_disk = json.loads(paths.robustness_report.read_text())
    assert on_disk == measured.report
    assert on_disk["images"] == len(measured.labels) == 24
    assert on_disk["sampling"] == "all"
    assert set(on_disk["fgsm"]) == {"0.0", "0.01", "0.03", "0.1"}
    assert set(on_disk["corruptions"]) == set(CORRUPTIONS)
    for name in CORRUPTIONS:
        assert set(on_disk["corruptions"][name]) == {"1", "2", "3"}
        assert set(on_disk["parameters"][name]["severities"]) == {"1", "2", "3"}
    for value in [
        *on_disk["fgsm"].values(),
        *(v for r in on_disk["corruptions"].values() for v in r.values()),
    ]:
        assert 0.0 <= value <= 1.0


def test_clean_and_fgsm_at_zero_equal_the_independent_accuracy(measured: Measured) -> None:
    assert measured.clean_accuracy >= 0.8, "the fixture's CNN must have learned the digits"
    assert measured.report["clean_accuracy"] == measured.clean_accuracy
    assert measured.report["fgsm"]["0.0"] == measured.clean_accuracy
    assert robustness.fgsm_accuracy(measured.report, 0.0) == measured.clean_accuracy


def test_fgsm_lowers_accuracy_as_epsilon_grows(measured: Measured) -> None:
    fgsm = measured.report["fgsm"]
    assert fgsm["0.1"] <= measured.clean_accuracy - 0.3, fgsm
    assert fgsm["0.01"] >= fgsm["0.03"] - ONE_IMAGE >= fgsm["0.1"] - 2 * ONE_IMAGE, fgsm


def test_fgsm_images_are_one_signed_step_within_range(measured: Measured) -> None:
    images, labels = measured.images, measured.labels
    adversarial = robustness.fgsm(measured.model, images, labels, 0.03)
    assert adversarial.shape == images.shape and adversarial.dtype == np.float32
    assert adversarial.min() >= 0.0 and adversarial.max() <= 255.0
    change = np.abs(adversarial - images)
    assert change.max() == pytest.approx(255 * 0.03, rel=1e-5)
    moved = (images > 8) & (images < 247)  # pixels the clip cannot stop
    assert np.mean(change[moved] > 7.0) > 0.9, "the gradient vanished for most pixels"
    np.testing.assert_array_equal(robustness.fgsm(measured.model, images, labels, 0.0), images)


def test_noise_hurts_more_with_severity(measured: Measured) -> None:
    noise = measured.report["corruptions"]["gaussian_noise"]
    assert noise["3"] <= noise["2"] + ONE_IMAGE <= noise["1"] + 2 * ONE_IMAGE, noise
    assert noise["3"] <= measured.clean_accuracy


def test_worst_corruption_is_the_lowest_cell(measured: Measured) -> None:
    report = measured.report
    worst = report["worst_corruption"]
    lowest = min(v for row in report["corruptions"].values() for v in row.values())
    assert worst["accuracy"] == lowest == report["corruptions"][worst["name"]][str(worst["severity"])]
    assert worst["drop"] == pytest.approx(report["clean_accuracy"] - lowest)


def test_the_plot_is_a_png(measured: Measured) -> None:
    with Image.open(measured.project.paths.robustness_plot) as image:
        assert image.format == "PNG"
        assert image.size == (1000, 400)
        assert len(set(np.asarray(image.convert("L")).ravel())) > 10  # not blank


def test_the_pipeline_run_has_the_metrics_and_reports(measured: Measured) -> None:
    paths = measured.project.paths
    run_id = json.loads(paths.run_file.read_text())["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{paths.root / 'mlflow.db'}")
    metrics = client.get_run(run_id).data.metrics
    assert metrics["robustness_clean_accuracy"] == measured.clean_accuracy
    assert metrics["robustness_fgsm_0_1"] == measured.report["fgsm"]["0.1"]
    assert metrics["robustness_fgsm_0_0"] == measured.clean_accuracy
    for name in CORRUPTIONS:
        for severity in ("1", "2", "3"):
            assert metrics[f"robustness_{name}_s{severity}"] == measured.report["corruptions"][name][severity]
    logged = {artifact.path for artifact in client.list_artifacts(run_id, "reports")}
    assert {"reports/robustness.json", "reports/robustness.png"} <= logged


def synthetic_images(count: int = 4, size: int = 32) -> np.ndarray:
    """Mid-grey images with a bright square and mild texture: room to move in both directions."""
    rng = np.random.default_rng(7)
    images = np.full((count, size, size, 3), 110.0, dtype=np.float32)
    images[:, size // 4 : size // 2, size // 4 : 3 * size // 4] = 200.0
    return np.clip(images + rng.normal(0, 10, images.shape), 0, 255).astype(np.float32)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_keep_shape_range_and_grow_with_severity(name: str) -> None:
    images = synthetic_images()
    before = images.copy()
    distances = []
    for severity in (1, 2, 3):
        out = robustness.corrupt(images, name, severity, np.random.default_rng(0))
        assert out.shape == images.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 255.0
        np.testing.assert_array_equal(
            out, robustness.corrupt(images, name, severity, np.random.default_rng(0))
        )
        distances.append(float(np.abs(out - images).mean()))
    np.testing.assert_array_equal(images, before)
    assert 0.0 < distances[0] < distances[1] < distances[2], distances


def test_noise_depends_on_the_seed_and_unknown_names_fail() -> None:
    images = synthetic_images()
    first = robustness.corrupt(images, "gaussian_noise", 1, np.random.default_rng(0))
    other = robustness.corrupt(images, "gaussian_noise", 1, np.random.default_rng(1))
    assert not np.array_equal(first, other)
    with pytest.raises(ValueError, match="unknown corruption"):
        robustness.corrupt(images, "fog", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="severity"):
        robustness.corrupt(images, "blur", 4, np.random.default_rng(0))


def test_fgsm_accuracy_finds_epsilons_written_any_way() -> None:
    report = {"fgsm": {"0.0": 0.9, "0.010": 0.7, "1e-1": 0.2, "note": 1.0}}
    assert robustness.fgsm_accuracy(report, 0.0) == 0.9
    assert robustness.fgsm_accuracy(report, 0.01) == 0.7
    assert robustness.fgsm_accuracy(report, 0.1) == 0.2
    assert robustness.fgsm_accuracy(report, 0.03) is None
    assert robustness.fgsm_accuracy({}, 0.01) is None


def test_the_subset_is_stratified_seeded_and_sorted() -> None:
    labels = np.repeat([0, 1, 2], [60, 30, 10])
    chosen, sampling = robustness.stratified_subset(labels, 20, seed=3)
    assert sampling == "stratified"
    assert np.bincount(labels[chosen]).tolist() == [12, 6, 2]
    assert np.all(np.diff(chosen) > 0)
    np.testing.assert_array_equal(chosen, robustness.stratified_subset(labels, 20, seed=3)[0])
    assert not np.array_equal(chosen, robustness.stratified_subset(labels, 20, seed=4)[0])
    everything, sampling = robustness.stratified_subset(labels, 500, seed=3)
    assert sampling == "all" and len(everything) == 100
    lonely = np.array([0] * 10 + [1])
    chosen, sampling = robustness.stratified_subset(lonely, 5, seed=0)
    assert sampling == "random" and len(set(chosen)) == 5

"""Exported models agree with the Keras model they came from.

The small CNN trained by the session fixture is exported once (SavedModel with an
encoded-bytes serving signature, four TFLite variants); every export is then run
on the real PNG files of the test split and compared with Keras.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pipeline import export
from pipeline.artifacts import image_files, load_trained_model, read_split
from pipeline.images import load_files
from tests.model.conftest import Project, local_tracking

pytestmark = pytest.mark.slow

REPORT_KEYS = {"size_bytes", "accuracy", "latency_ms_median", "agreement_with_keras"}
# Minimum share of test images on which a variant's argmax equals the Keras argmax.
MIN_AGREEMENT = {"float32": 1.0, "float16": 0.95, "dynamic_range": 0.95, "int8": 0.9}
# Largest absolute difference of any probability from the Keras one.
MAX_PROBABILITY_DIFF = {"float32": 1e-4, "float16": 1e-2, "dynamic_range": 0.1, "int8": 0.25}


@dataclass(frozen=True)
class Exported:
    project: Project
    names: list[str]
    labels: np.ndarray
    images: np.ndarray
    keras_probabilities: np.ndarray
    served: dict[str, np.ndarray]


@pytest.fixture(scope="module")
def exported(trained_project: Project) -> Exported:
    cfg, paths = trained_project.cfg, trained_project.paths
    with local_tracking():
        export.run(cfg, paths)
    model, names = load_trained_model(paths)
    test = read_split(paths, "test")
    images = load_files(image_files(test, paths.root), cfg.train.image_size)
    keras_probabilities = model.predict(images, verbose=0)
    served = export.savedmodel_predict(
        paths.savedmodel, [(paths.root / p).read_bytes() for p in test["path"]]
    )
    labels = np.array([names.index(label) for label in test["label"]])
    return Exported(trained_project, names, labels, images, keras_probabilities, served)


def test_the_model_learned_something(exported: Exported) -> None:
    """Agreement is only meaningful on a model that is not constant; the digits are easy."""
    predicted = exported.keras_probabilities.argmax(axis=1)
    assert len(exported.labels) >= 20
    assert (predicted == exported.labels).mean() >= 0.8
    assert len(set(predicted)) == len(exported.names)


def test_savedmodel_on_png_bytes_matches_keras(exported: Exported) -> None:
    served, keras_probabilities = exported.served, exported.keras_probabilities
    assert served["probabilities"].shape == keras_probabilities.shape
    np.testing.assert_allclose(served["probabilities"], keras_probabilities, atol=1e-5)
    np.testing.assert_array_equal(served["probabilities"].argmax(axis=1), keras_probabilities.argmax(axis=1))


def test_savedmodel_names_the_predicted_class(exported: Exported) -> None:
    paths = exported.project.paths
    labels_txt = paths.labels.read_text(encoding="utf-8").splitlines()
    assert labels_txt == exported.names
    predicted = [name.decode() for name in exported.served["predicted_class"]]
    assert predicted == [labels_txt[i] for i in exported.served["probabilities"].argmax(axis=1)]
    assert predicted == [labels_txt[i] for i in exported.keras_probabilities.argmax(axis=1)]
    class_names = exported.served["class_names"]
    assert class_names.shape == (len(predicted), len(labels_txt))
    assert all([name.decode() for name in row] == labels_txt for row in class_names)


def test_serving_signature_takes_one_string_tensor_of_image_bytes(exported: Exported) -> None:
    signature = tf.saved_model.load(str(exported.project.paths.savedmodel)).signatures["serving_default"]
    args, kwargs = signature.structured_input_signature
    assert args == ()
    assert list(kwargs) == ["image_bytes"]
    spec = kwargs["image_bytes"]
    assert spec.dtype == tf.string
    assert spec.shape.as_list() == [None]
    assert set(signature.structured_outputs) == {"probabilities", "predicted_class", "class_names"}


def test_saved_model_cli_shows_the_serving_signature(exported: Exported) -> None:
    cli = Path(sys.executable).parent / "saved_model_cli"
    assert cli.is_file(), f"{cli} not installed next to the interpreter"
    shown = subprocess.run(
        [str(cli), "show", "--all", "--dir", str(exported.project.paths.savedmodel)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    assert "serving_default" in shown
    assert "image_bytes" in shown
    assert "DT_STRING" in shown


@pytest.mark.parametrize("variant", export.VARIANTS)
def test_tflite_variant_agrees_with_keras(exported: Exported, variant: str) -> None:
    path = exported.project.paths.tflite / f"model_{variant}.tflite"
    probabilities, latency = export.tflite_predict(path, exported.images)
    keras_probabilities = exported.keras_probabilities
    assert probabilities.shape == keras_probabilities.shape
    assert latency > 0
    agreement = (probabilities.argmax(axis=1) == keras_probabilities.argmax(axis=1)).mean()
    assert agreement >= MIN_AGREEMENT[variant], f"{variant}: agreement {agreement:.3f}"
    diff = np.abs(probabilities - keras_probabilities).max()
    assert diff <= MAX_PROBABILITY_DIFF[variant], f"{variant}: max probability difference {diff:.2e}"


def test_export_report_lists_every_variant(exported: Exported) -> None:
    paths = exported.project.paths
    report = json.loads(paths.export_report.read_text())
    assert set(report["tflite"]) == set(export.VARIANTS)
    keras_predicted = exported.keras_probabilities.argmax(axis=1)
    keras_accuracy = report["keras"]["accuracy"]
    assert keras_accuracy == pytest.approx((keras_predicted == exported.labels).mean())
    for variant, row in report["tflite"].items():
        assert set(row) >= REPORT_KEYS, variant
        file = paths.tflite / row["file"]
        assert row["size_bytes"] == file.stat().st_size > 0
        # Where a variant's argmax equals Keras', so does its hit; only the rest can change accuracy.
        assert abs(row["accuracy"] - keras_accuracy) <= 1.0 - row["agreement_with_keras"] + 1e-9, variant
        assert row["latency_ms_median"] > 0
        assert row["agreement_with_keras"] >= MIN_AGREEMENT[variant]
    assert report["tflite"]["int8"]["size_bytes"] < report["tflite"]["float32"]["size_bytes"]
    assert report["savedmodel"]["agreement_with_keras"] == 1.0


def test_the_tf_serving_layout_holds_the_savedmodel_under_an_integer_version_with_a_labelled_config(
    exported: Exported,
) -> None:
    import re

    from pipeline.serving.model import ServableVersion

    cfg, paths = exported.project.cfg, exported.project.paths
    name = cfg.mlflow.registered_model
    report = json.loads(paths.export_report.read_text())["tf_serving"]
    versions = [p.name for p in (paths.tf_serving / name).iterdir()]
    assert versions == [str(report["version"])] and versions[0].isdigit()
    folder = paths.tf_serving / name / versions[0]
    assert (folder / "saved_model.pb").is_file() and (folder / "variables").is_dir()
    assert report["path"] == paths.relative(folder)

    config = (paths.tf_serving / "models.config").read_text()
    assert re.search(rf'name: "{name}"', config) and re.search(rf'base_path: "/models/{name}"', config)
    assert re.search(rf"versions: {versions[0]}\b", config)
    assert re.search(rf'version_labels {{ key: "stable" value: {versions[0]} }}', config)
    assert config.count("{") == config.count("}")

    test = read_split(paths, "test")
    served = ServableVersion.load(name, versions[0], folder).predict(
        [f.read_bytes() for f in image_files(test, paths.root)]
    )
    assert np.abs(served["probabilities"] - exported.served["probabilities"]).max() < 1e-6

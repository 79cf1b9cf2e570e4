"""Export's compressed variants on a real trained model: ONNX, int8 by QAT when PTQ loses, pruning.

Two exports of copies of the session's trained CNN: one with pruning on
(ONNX checked on the way), one of a model made fragile for post-training
int8 (one activation channel scaled up 1000x, the next layer scaled down to
match: the same function in float, but per-tensor int8 activations lose the
other channels), with ONNX converters that fail for real (an opset no
converter knows), so the rest of the export has to finish without them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf

from pipeline import export, gate, registry, tracking
from pipeline.artifacts import image_files, load_trained_model, read_split
from pipeline.compress import onnx_export
from pipeline.compress.tf_keras_copy import to_tf_keras
from pipeline.images import load_files
from tests.model.conftest import Project, build_config, local_tracking

pytestmark = pytest.mark.slow


def copy_project(project: Project, target: Path, *overrides: dict) -> Project:
    shutil.copytree(project.paths.root, target)
    cfg, paths = build_config(target, *overrides)
    return Project(cfg, paths)


def split_images(project: Project) -> tuple[np.ndarray, np.ndarray, list[str]]:
    model, names = load_trained_model(project.paths)
    test = read_split(project.paths, "test")
    images = load_files(image_files(test, project.paths.root), int(model.input_shape[1]))
    return images, np.array([names.index(label) for label in test["label"]]), names


@pytest.fixture(scope="module")
def pruned(trained_project: Project, tmp_path_factory: pytest.TempPathFactory) -> tuple[Project, dict]:
    project = copy_project(
        trained_project,
        tmp_path_factory.mktemp("pruned") / "project",
        {"export": {"prune": {"target_sparsity": 0.5, "epochs": 2, "batch_size": 16}}},
    )
    with local_tracking():
        export.run(project.cfg, project.paths)
    return project, json.loads(project.paths.export_report.read_text())


def test_onnx_export_matches_keras_on_the_whole_test_split(pruned: tuple[Project, dict]) -> None:
    project, report = pruned
    onnx = report["onnx"]
    assert onnx["status"] == "ok", onnx
    assert onnx["file"] == "models/onnx/model.onnx" and project.paths.onnx.is_file()
    assert onnx["agreement_with_keras"] == 1.0
    assert onnx["max_probability_diff"] < 1e-4, onnx["max_probability_diff"]
    # Independently of the stage: onnxruntime on the file against Keras on the same images.
    images, labels, _ = split_images(project)
    model, _ = load_trained_model(project.paths)
    ours, _ = onnx_export.onnx_predict(project.paths.onnx, images)
    theirs = model.predict(images, verbose=0)
    assert (ours.argmax(axis=1) == theirs.argmax(axis=1)).all()
    assert np.abs(ours - theirs).max() < 1e-4
    assert onnx["accuracy"] == pytest.approx(float((ours.argmax(axis=1) == labels).mean()))
    run_id = json.loads(project.paths.run_file.read_text())["run_id"]
    with local_tracking():
        tracking.configure(project.cfg.mlflow, project.paths.root)
        client = mlflow.MlflowClient()
        logged = client.get_run(run_id)
        assert [a.path for a in client.list_artifacts(run_id, "onnx")] == ["onnx/model.onnx"]
    assert logged.data.metrics["onnx_max_probability_diff"] == pytest.approx(onnx["max_probability_diff"])


def test_the_pruned_model_reaches_its_sparsity_and_stays_within_the_gate(
    pruned: tuple[Project, dict],
) -> None:
    project, report = pruned
    row = report["tflite"]["pruned_int8"]
    assert row["sparsity"] >= 0.5 - 1e-3, row
    assert (project.paths.tflite / row["file"]).is_file()
    # Its zeros compress: the pruned int8 file gzips well below the dense int8 one.
    assert row["gzip_size_bytes"] < 0.8 * report["tflite"]["int8"]["gzip_size_bytes"], row
    metrics = {"accuracy": report["keras"]["accuracy"], "macro_f1": 1.0}
    checks = {c.name: c for c in gate.threshold_checks(metrics, {"accuracy": 0.0}, report, project.cfg.gate)}
    assert checks["pruned_accuracy_drop"].status == "passed", checks["pruned_accuracy_drop"]
    assert checks["pruned_accuracy_drop"].value == pytest.approx(
        report["keras"]["accuracy"] - row["accuracy"]
    )
    assert report["int8"]["used"] == "ptq"  # the healthy model's PTQ is within the threshold: no QAT


def make_int8_fragile(model: keras.Model, scale: float = 1000.0) -> None:
    """Scale the last convolution's first output channel up and the classifier's input row down."""
    last = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][-1]
    kernel, bias = last.get_weights()
    kernel[..., 0] *= scale
    bias[0] *= scale
    last.set_weights([kernel, bias])
    dense = model.get_layer("probabilities")
    weights, dense_bias = dense.get_weights()
    weights[0, :] /= scale
    dense.set_weights([weights, dense_bias])


def test_auto_runs_qat_when_ptq_loses_too_much_and_the_gate_checks_the_qat_model(
    trained_project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = copy_project(
        trained_project,
        tmp_path / "project",
        {"export": {"int8": "auto"}, "gate": {"max_int8_accuracy_drop": 0.0}},
    )
    model, _ = load_trained_model(project.paths)
    make_int8_fragile(model)
    model.save(project.paths.keras_model)
    monkeypatch.setattr(onnx_export, "OPSET", 999)  # no converter supports it: both fail, for real
    with local_tracking():
        export.run(project.cfg, project.paths)
    report = json.loads(project.paths.export_report.read_text())

    int8, rows = report["int8"], report["tflite"]
    keras_accuracy = report["keras"]["accuracy"]
    assert int8["ptq_accuracy_drop"] > 0.0, int8  # the precondition: PTQ loses accuracy on this model
    assert int8["used"] == "qat" and "PTQ drop" in int8["reason"], int8
    assert rows["int8_ptq"]["file"] == "model_int8_ptq.tflite" and rows["int8"]["source"] == "qat"
    assert (project.paths.tflite / "model_int8_ptq.tflite").is_file()
    assert rows["int8"]["accuracy"] > rows["int8_ptq"]["accuracy"], (rows["int8"], rows["int8_ptq"])
    # The gate's int8 check reads the QAT model's accuracy, not PTQ's.
    metrics = {"accuracy": keras_accuracy, "macro_f1": 1.0}
    checks = {c.name: c for c in gate.threshold_checks(metrics, {"accuracy": 0.0}, report, project.cfg.gate)}
    assert checks["int8_accuracy_drop"].value == pytest.approx(keras_accuracy - rows["int8"]["accuracy"])
    assert "qat" in checks["int8_accuracy_drop"].detail

    # ONNX failed with both converters named and why; everything else was exported.
    onnx = report["onnx"]
    assert onnx["status"] == "failed" and set(onnx["errors"]) == {name for name, _ in onnx_export.CONVERTERS}
    assert all(reason for reason in onnx["errors"].values()), onnx
    assert not project.paths.onnx.exists()
    assert {"float32", "float16", "dynamic_range", "int8", "int8_ptq"} <= set(rows)
    assert (project.paths.savedmodel / "saved_model.pb").is_file()

    # tfmot's import switches a process to Keras 2 (TF_USE_LEGACY_KERAS=1); after QAT ran in this one,
    # `tf.keras` must still be Keras 3, or MLflow refuses the model at register ("Unknown model type").
    assert "TF_USE_LEGACY_KERAS" not in os.environ
    assert isinstance(model, tf.keras.Model)
    with local_tracking():
        tracking.configure(project.cfg.mlflow, project.paths.root)
        with mlflow.start_run():
            assert registry.log_and_register(model, "registered-after-qat") == "1"


def test_the_tf_keras_copy_computes_the_same_function(trained_project: Project) -> None:
    images, _, _ = split_images(trained_project)
    model, _ = load_trained_model(trained_project.paths)
    copy = to_tf_keras(model)
    assert np.abs(np.asarray(copy(images, training=False)) - model.predict(images, verbose=0)).max() < 1e-5

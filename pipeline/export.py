"""export: a SavedModel that serves encoded image bytes, TFLite variants measured with LiteRT, and ONNX.

The int8 TFLite model comes from post-training quantization or, when that
loses too much (`export.int8: auto`) or when asked (`qat`), from
quantization-aware training; `export.prune` adds a pruned int8 variant.
All are scored on the whole test split; reports/export.json lists each.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import tensorflow as tf

from pipeline import registry, tracking
from pipeline.artifacts import image_files, input_size, load_trained_model, read_split, write_report
from pipeline.compress import onnx_export
from pipeline.compress.tfmot import full_integer
from pipeline.compress.variants import (  # tflite_predict, score_variant: also used from here
    Scoring,
    int8_variant,
    pruned_variant,
    score_variant,
    tflite_predict,
    training_data,
)
from pipeline.config import PipelineConfig
from pipeline.images import decode_and_resize, load_files
from pipeline.inference import predict
from pipeline.paths import StagePaths

log = logging.getLogger(__name__)

__all__ = ["VARIANTS", "convert_tflite", "export_savedmodel", "run", "score_variant", "tflite_predict"]

VARIANTS = ("float32", "float16", "dynamic_range", "int8")


@dataclass(frozen=True)
class ExportResult:
    """Where the exports are and how each TFLite variant scored."""

    savedmodel: Path
    variants: dict[str, dict]


def export_savedmodel(model, class_names: list[str], image_size: int, target: Path) -> None:
    """Write a SavedModel whose `serving_default` takes encoded image bytes.

    Decoding and resizing run inside the graph with the same function the
    training pipeline uses, so serving cannot skew from training. Outputs:
    `probabilities` (N, classes), `predicted_class` (N,) and `class_names` (N, classes).
    """
    import keras

    names = tf.constant(class_names)

    def serve(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        pixels = tf.map_fn(
            lambda b: decode_and_resize(b, image_size),
            image_bytes,
            fn_output_signature=tf.TensorSpec((image_size, image_size, 3), tf.float32),
        )
        probabilities = model(pixels, training=False)
        batch = tf.shape(probabilities)[0]
        return {
            "probabilities": probabilities,
            "predicted_class": tf.gather(names, tf.argmax(probabilities, axis=1)),
            "class_names": tf.tile(names[None, :], [batch, 1]),
        }

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default", serve, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")]
    )
    if target.exists():
        shutil.rmtree(target)
    archive.write_out(str(target), verbose=False)


def write_tf_serving_layout(savedmodel: Path, target: Path, model_name: str, version: int) -> Path:
    """`<target>/<model name>/<version>/` (a copy of the SavedModel) and `<target>/models.config`.

    This is the folder a real `tensorflow_model_server` serves (README: Serving):
    the versioned base path, and a model config whose version label `stable`
    points at this export. Returns the version folder.
    """
    if target.exists():
        shutil.rmtree(target)
    folder = target / model_name / str(version)
    shutil.copytree(savedmodel, folder)
    (target / "models.config").write_text(
        "model_config_list {\n"
        "  config {\n"
        f'    name: "{model_name}"\n'
        f'    base_path: "/models/{model_name}"\n'
        '    model_platform: "tensorflow"\n'
        f"    model_version_policy {{ specific {{ versions: {version} }} }}\n"
        f'    version_labels {{ key: "stable" value: {version} }}\n'
        "  }\n"
        "}\n",
        encoding="utf-8",
    )
    return folder


def convert_tflite(model, calibration: np.ndarray) -> dict[str, bytes]:
    """float32, float16, dynamic-range and full-integer int8 (uint8 pixels in) TFLite models."""
    with tempfile.TemporaryDirectory() as folder:
        model.export(folder, format="tf_saved_model", verbose=False)
        flat: dict[str, bytes] = {}
        for variant in VARIANTS:
            converter = tf.lite.TFLiteConverter.from_saved_model(folder)
            if variant != "float32":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            if variant == "float16":
                converter.target_spec.supported_types = [tf.float16]
            if variant == "int8":
                full_integer(converter, calibration)
            flat[variant] = converter.convert()
    return flat


def savedmodel_predict(folder: Path, image_bytes: list[bytes]) -> dict[str, np.ndarray]:
    """Call the exported serving signature on encoded images."""
    served = tf.saved_model.load(str(folder)).signatures["serving_default"]
    outputs = served(image_bytes=tf.constant(image_bytes))
    return {key: value.numpy() for key, value in outputs.items()}


def run(cfg: PipelineConfig, paths: StagePaths) -> ExportResult:
    """Export the trained model and measure every variant on the whole test split."""
    model, names = load_trained_model(paths)
    size = input_size(model)
    test, train = read_split(paths, "test"), read_split(paths, "train")
    images = load_files(image_files(test, paths.root), size)
    labels = np.array([names.index(label) for label in test["label"]])
    keras_probabilities = predict(model, images)
    keras_predicted = keras_probabilities.argmax(axis=1)
    scoring = Scoring(images, labels, keras_predicted)
    calibration_rows = train.sample(min(cfg.export.calibration_images, len(train)), random_state=0)
    calibration = load_files(image_files(calibration_rows, paths.root), size)

    @functools.cache
    def data_of():  # the train split is loaded only when QAT or pruning needs it, and once
        return training_data(cfg, paths, names, size, calibration)

    export_savedmodel(model, names, size, paths.savedmodel)
    # TF Serving wants integer versions, newest highest; the registry's version is only known at
    # register, so the export's time in seconds orders exports the way TF Serving's own docs do.
    version = int(time.time())
    served_folder = write_tf_serving_layout(
        paths.savedmodel, paths.tf_serving, cfg.mlflow.registered_model, version
    )
    served = savedmodel_predict(paths.savedmodel, [f.read_bytes() for f in image_files(test, paths.root)])
    if paths.tflite.exists():
        shutil.rmtree(paths.tflite)  # no variant of an earlier run is left to be mistaken for this one's
    paths.tflite.mkdir(parents=True)
    variants = {}
    for variant, flat in convert_tflite(model, calibration).items():
        target = paths.tflite / f"model_{variant}.tflite"
        target.write_bytes(flat)
        variants[variant] = scoring.score(target)
    int8 = int8_variant(cfg, model, variants, scoring, data_of, paths.tflite)
    pruned = pruned_variant(cfg, model, scoring, data_of, paths.tflite)
    if pruned is not None and pruned.get("status") != "failed":
        variants["pruned_int8"] = pruned
    onnx: dict = {"status": "disabled (export.onnx: false)"}
    if paths.onnx.parent.exists():
        shutil.rmtree(paths.onnx.parent)
    paths.onnx.parent.mkdir(parents=True)  # a DVC output: present (empty) when ONNX is off or failed
    if cfg.export.onnx:
        onnx = onnx_export.export_onnx(model, paths.onnx, images, labels, keras_probabilities)
        onnx["file"] = paths.relative(paths.onnx) if paths.onnx.is_file() else None
    paths.labels.write_text("\n".join(names) + "\n", encoding="utf-8")
    report = {
        "keras": {"accuracy": float((keras_predicted == labels).mean())},
        "savedmodel": {
            "signature": "serving_default",
            "accuracy": float((served["probabilities"].argmax(axis=1) == labels).mean()),
            "agreement_with_keras": float((served["probabilities"].argmax(axis=1) == keras_predicted).mean()),
        },
        "tflite": variants,
        "int8": int8,
        **({"pruning": pruned} if pruned is not None else {}),
        "onnx": onnx,
        "tf_serving": {
            "model_name": cfg.mlflow.registered_model,
            "version": version,
            "path": paths.relative(served_folder),
            "config": paths.relative(paths.tf_serving / "models.config"),
        },
    }
    write_report(report, paths.export_report)
    log_to_mlflow(cfg, paths, variants, onnx, int8)
    return ExportResult(paths.savedmodel, variants)


def log_to_mlflow(cfg: PipelineConfig, paths: StagePaths, variants: dict, onnx: dict, int8: dict) -> None:
    """Every variant's figures as metrics, the files as artifacts, the int8 path as a tag."""
    metrics = {
        f"tflite_{v}_{k}": float(x)
        for v, row in variants.items()
        for k, x in row.items()
        if isinstance(x, int | float) and not isinstance(x, bool)
    }
    metrics.update(
        {
            f"onnx_{k}": float(x)
            for k, x in onnx.items()
            if isinstance(x, int | float) and not isinstance(x, bool)
        }
    )
    with tracking.resume_run(cfg.mlflow, paths):
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"export.int8": int8["used"], "export.onnx": onnx["status"]})
        mlflow.log_artifacts(str(paths.tflite), "tflite")
        if paths.onnx.is_file():
            mlflow.log_artifact(str(paths.onnx), "onnx")
        mlflow.log_artifacts(str(paths.savedmodel), registry.SAVEDMODEL_ARTIFACT)  # what the service loads
        mlflow.log_artifact(str(paths.export_report), "reports")
        mlflow.log_artifact(str(paths.labels))
    for variant, row in variants.items():
        log.info(
            "%-13s %8d bytes (gzip %8d)  accuracy %.4f  %.3f ms  agreement %.4f",
            variant,
            row["size_bytes"],
            row["gzip_size_bytes"],
            row["accuracy"],
            row["latency_ms_median"],
            row["agreement_with_keras"],
        )
    log.info("int8: %s (%s); ONNX: %s", int8["used"], int8["reason"], onnx["status"])

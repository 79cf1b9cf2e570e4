"""export: a SavedModel that serves encoded image bytes, TFLite variants measured with LiteRT, and ONNX.

The int8 TFLite model comes from post-training quantization or, when that
loses too much (`export.int8: auto`) or when asked (`qat`), from
quantization-aware training; `export.prune` adds a pruned int8 variant.
All are scored on the whole test split; reports/export.json lists each.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import tensorflow as tf

from pipeline import registry, tracking
from pipeline.artifacts import image_files, input_size, load_trained_model, read_split, write_report
from pipeline.compress import onnx_export
from pipeline.compress.tf_keras_copy import UnsupportedModel
from pipeline.config import PipelineConfig
from pipeline.images import decode_and_resize, load_files
from pipeline.inference import predict
from pipeline.paths import StagePaths

log = logging.getLogger(__name__)

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


def _representative(images: np.ndarray) -> Callable[[], Iterator[list[np.ndarray]]]:
    def generate() -> Iterator[list[np.ndarray]]:
        for image in images:
            yield [image[None].astype(np.float32)]

    return generate


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
                converter.representative_dataset = _representative(calibration)
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                converter.inference_input_type = tf.uint8  # raw pixels 0..255 need no scaling
            flat[variant] = converter.convert()
    return flat


def tflite_predict(model_path: Path, images: np.ndarray) -> tuple[np.ndarray, float]:
    """Probabilities for each image (batch of 1) with the LiteRT interpreter, and median ms per image."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model_path))
    interpreter.allocate_tensors()
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    outputs, timings = [], []
    for image in images:
        batch = image[None]
        if source["dtype"] != np.float32:
            scale, zero_point = source["quantization"]
            info = np.iinfo(source["dtype"])
            batch = np.clip(np.round(batch / scale + zero_point), info.min, info.max)
        interpreter.set_tensor(source["index"], batch.astype(source["dtype"]))
        start = time.perf_counter()
        interpreter.invoke()
        timings.append((time.perf_counter() - start) * 1000.0)
        output = interpreter.get_tensor(target["index"])[0].astype(np.float32)
        if target["dtype"] != np.float32:
            scale, zero_point = target["quantization"]
            output = (output - zero_point) * scale
        outputs.append(output)
    return np.stack(outputs), float(np.median(timings))


def score_variant(path: Path, images: np.ndarray, labels: np.ndarray, keras_predicted: np.ndarray) -> dict:
    """Size, accuracy, latency and agreement with the Keras model of one TFLite file."""
    probabilities, latency = tflite_predict(path, images)
    predicted = probabilities.argmax(axis=1)
    flat = path.read_bytes()
    return {
        "file": path.name,
        "size_bytes": len(flat),
        "gzip_size_bytes": len(gzip.compress(flat, 9)),  # what pruning's zeros save on the wire
        "accuracy": float((predicted == labels).mean()),
        "latency_ms_median": latency,
        "agreement_with_keras": float((predicted == keras_predicted).mean()),
    }


def savedmodel_predict(folder: Path, image_bytes: list[bytes]) -> dict[str, np.ndarray]:
    """Call the exported serving signature on encoded images."""
    served = tf.saved_model.load(str(folder)).signatures["serving_default"]
    outputs = served(image_bytes=tf.constant(image_bytes))
    return {key: value.numpy() for key, value in outputs.items()}


@dataclass(frozen=True)
class Scoring:
    """The test split as every variant is scored on it."""

    images: np.ndarray
    labels: np.ndarray
    keras_predicted: np.ndarray

    def score(self, path: Path) -> dict:
        return score_variant(path, self.images, self.labels, self.keras_predicted)


def training_data(cfg: PipelineConfig, paths: StagePaths, names: list[str], size: int, calibration):
    """The train split in memory, for quantization-aware training and pruning."""
    from pipeline.compress.tfmot import TrainingData

    train = read_split(paths, "train")
    labels = np.array([names.index(label) for label in train["label"]])
    return TrainingData(load_files(image_files(train, paths.root), size), labels, calibration)


def int8_variant(
    cfg: PipelineConfig, model, variants: dict[str, dict], scoring: Scoring, data_of, tflite: Path
):
    """Keep post-training int8, or replace it by quantization-aware training; returns the decision.

    `auto` runs QAT only when PTQ loses more than gate.max_int8_accuracy_drop
    on the test split. The PTQ file stays as model_int8_ptq.tflite for comparison.
    """
    from pipeline.compress import tfmot

    keras_accuracy = float((scoring.keras_predicted == scoring.labels).mean())
    ptq_drop = keras_accuracy - variants["int8"]["accuracy"]
    limit = cfg.gate.max_int8_accuracy_drop
    mode = cfg.export.int8
    decision: dict = {"mode": mode, "ptq_accuracy_drop": round(ptq_drop, 6), "max_drop": limit}
    if mode == "ptq" or (mode == "auto" and ptq_drop <= limit):
        reason = "export.int8 is ptq" if mode == "ptq" else f"PTQ drop {ptq_drop:.4f} <= {limit}"
        return {**decision, "used": "ptq", "reason": reason}
    reason = "export.int8 is qat" if mode == "qat" else f"PTQ drop {ptq_drop:.4f} > {limit}"
    try:
        flat = tfmot.quantization_aware(
            model, data_of(), cfg.export.qat_epochs, cfg.export.qat_learning_rate, cfg.train.seed
        )
    except (UnsupportedModel, ValueError, RuntimeError) as error:  # tfmot cannot wrap a layer
        log.warning("quantization-aware training failed, keeping PTQ int8: %s", error)
        return {**decision, "used": "ptq", "reason": f"{reason}, but QAT failed: {error}"}
    ptq_file = tflite / "model_int8_ptq.tflite"
    shutil.move(tflite / "model_int8.tflite", ptq_file)
    variants["int8_ptq"] = {**variants.pop("int8"), "file": ptq_file.name}
    (tflite / "model_int8.tflite").write_bytes(flat)
    variants["int8"] = {**scoring.score(tflite / "model_int8.tflite"), "source": "qat"}
    qat_drop = keras_accuracy - variants["int8"]["accuracy"]
    log.info("int8 by QAT (%s): accuracy drop %.4f (PTQ %.4f)", reason, qat_drop, ptq_drop)
    return {**decision, "used": "qat", "reason": reason, "qat_accuracy_drop": round(qat_drop, 6)}


def pruned_variant(cfg: PipelineConfig, model, scoring: Scoring, data_of, tflite: Path) -> dict | None:
    """With export.prune set: a pruned int8 TFLite model, its sparsity and gzip size."""
    from pipeline.compress import tfmot

    prune = cfg.export.prune
    target = tflite / "model_pruned_int8.tflite"
    target.unlink(missing_ok=True)
    if prune is None:
        return None
    try:
        pruned = tfmot.prune(
            model,
            data_of(),
            prune.target_sparsity,
            prune.epochs,
            prune.min_steps,
            prune.batch_size,
            cfg.train.seed,
        )
    except (UnsupportedModel, ValueError, RuntimeError) as error:
        log.warning("pruning failed: %s", error)
        return {"status": "failed", "error": str(error)}
    target.write_bytes(pruned.tflite)
    return {
        **scoring.score(target),
        "source": "pruned",
        "target_sparsity": prune.target_sparsity,
        "sparsity": round(pruned.sparsity, 6),
    }


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
    cached: list = []

    def data_of():  # the train split is loaded only when QAT or pruning needs it, and once
        if not cached:
            cached.append(training_data(cfg, paths, names, size, calibration))
        return cached[0]

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
    onnx = {"status": "disabled (export.onnx: false)"}
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

"""The TFLite variants beyond post-training quantization: int8 by QAT, pruned int8; and their scoring.

Every variant is scored the same way on the whole test split: LiteRT, one
image per call, size and gzip size, accuracy and agreement with Keras.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.artifacts import image_files, read_split
from pipeline.compress.tf_keras_copy import UnsupportedModel
from pipeline.config import PipelineConfig
from pipeline.images import load_files
from pipeline.paths import StagePaths

log = logging.getLogger(__name__)


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

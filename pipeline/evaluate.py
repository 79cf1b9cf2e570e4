"""evaluate: test-split metrics, calibration, confusion matrix and CPU latency of the Keras model."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from pipeline import tracking
from pipeline.artifacts import image_files, input_size, load_trained_model, read_split, write_report
from pipeline.config import PipelineConfig
from pipeline.images import load_files
from pipeline.inference import predict
from pipeline.paths import StagePaths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    """The headline test metrics."""

    accuracy: float
    macro_f1: float
    metrics: dict


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """ECE: the gap between confidence and accuracy, weighted over equal-width confidence bins.

    Written by hand: scikit-learn offers calibration_curve but no ECE.
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    gap = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            gap += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(gap)


def classification_metrics(
    labels: np.ndarray, probabilities: np.ndarray, names: list[str], top_k: int, bins: int
) -> dict:
    """Accuracy, macro and per-class precision/recall/F1, top-k accuracy and ECE."""
    predicted = probabilities.argmax(axis=1)
    classes = np.arange(len(names))
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predicted, labels=classes, average="macro", zero_division=0
    )
    per_p, per_r, per_f, support = precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0
    )
    k = min(top_k, len(names) - 1) if len(names) > 2 else 1
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_precision": float(precision),
        "macro_recall": float(recall),
        "macro_f1": float(f1),
        f"top_{k}_accuracy": float(top_k_accuracy_score(labels, probabilities, k=k, labels=classes))
        if len(names) > 2
        else float(accuracy_score(labels, predicted)),
        "expected_calibration_error": expected_calibration_error(probabilities, labels, bins),
        "test_images": int(len(labels)),
        "per_class": {
            name: {
                "precision": float(per_p[i]),
                "recall": float(per_r[i]),
                "f1": float(per_f[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
    }


def latency_ms(model, images: np.ndarray, count: int) -> float:
    """Median milliseconds to classify one image (batch of 1) with the Keras model on this machine."""
    sample = images[: max(1, min(count, len(images)))]
    model.predict_on_batch(sample[:1])  # trace and warm up
    timings = []
    for image in sample:
        start = time.perf_counter()
        model.predict_on_batch(image[None])
        timings.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(timings))


def plot_confusion(matrix: np.ndarray, names: list[str], path: Path) -> None:
    """A labelled confusion-matrix heat map."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    size = max(4.0, 0.5 * len(names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(matrix, cmap="Blues")
    axis.set(
        xticks=range(len(names)),
        yticks=range(len(names)),
        xticklabels=names,
        yticklabels=names,
        xlabel="predicted",
        ylabel="actual",
        title="Confusion matrix (test split)",
    )
    for (row, col), value in np.ndenumerate(matrix):
        axis.text(
            col,
            row,
            str(value),
            ha="center",
            va="center",
            color="white" if value > matrix.max() / 2 else "black",
            fontsize=8,
        )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def score_test_split(
    cfg: PipelineConfig, paths: StagePaths
) -> tuple[object, list[str], pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """The model, class names, test rows, test images, true class indices and predicted probabilities."""
    model, names = load_trained_model(paths)
    test = read_split(paths, "test")
    images = load_files(image_files(test, paths.root), input_size(model))
    labels = np.array([names.index(label) for label in test["label"]])
    probabilities = predict(model, images)
    return model, names, test, images, labels, probabilities


def write_reports(
    metrics: dict, labels: np.ndarray, probabilities: np.ndarray, names: list[str], paths: StagePaths
) -> None:
    """metrics.json, the confusion matrix PNG, the classification report and per-image predictions."""
    predicted = probabilities.argmax(axis=1)
    write_report(metrics, paths.metrics)
    plot_confusion(
        confusion_matrix(labels, predicted, labels=range(len(names))),
        names,
        paths.confusion_matrix,
    )
    paths.classification_report.write_text(
        classification_report(
            labels, predicted, labels=range(len(names)), target_names=names, digits=4, zero_division=0
        )
    )
    pd.DataFrame({"actual": [names[i] for i in labels], "predicted": [names[i] for i in predicted]}).to_csv(
        paths.predictions, index=False, lineterminator="\n"
    )


def keras_file_bytes(model: Any) -> int:
    """The size of the model saved as a .keras file."""
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "model.keras"
        model.save(target)
        return target.stat().st_size


def model_figures(model: Any, images: np.ndarray, labels: np.ndarray, latency_images: int) -> dict:
    """Accuracy, size and CPU latency of one model on the test images (at its own input size)."""
    predicted = predict(model, images).argmax(axis=1)
    return {
        "accuracy": float((predicted == labels).mean()),
        "params": int(model.count_params()),
        "keras_file_bytes": keras_file_bytes(model),
        "latency_ms_per_image": latency_ms(model, images, latency_images),
    }


def distillation_comparison(
    cfg: PipelineConfig, paths: StagePaths, model: Any, names: list[str], labels: np.ndarray
) -> dict:
    """Student (this model) and teacher (train.distill.teacher) on the same test split."""
    from pipeline.teacher import load_teacher

    assert cfg.train.distill is not None
    teacher = load_teacher(cfg.train.distill, cfg.mlflow, paths.root, names)
    files = image_files(read_split(paths, "test"), paths.root)
    budget = cfg.evaluate.latency_images
    student = model_figures(model, load_files(files, input_size(model)), labels, budget)
    taught = model_figures(teacher.model, load_files(files, input_size(teacher.model)), labels, budget)
    return {
        "teacher": {**teacher.describe(), **taught},
        "student": student,
        "temperature": cfg.train.distill.temperature,
        "alpha": cfg.train.distill.alpha,
        "accuracy_gap": round(taught["accuracy"] - student["accuracy"], 6),
        "size_ratio": round(student["keras_file_bytes"] / taught["keras_file_bytes"], 4),
        "latency_ratio": round(student["latency_ms_per_image"] / taught["latency_ms_per_image"], 4),
    }


def run(cfg: PipelineConfig, paths: StagePaths) -> EvaluateResult:
    """Evaluate the trained model on the test split and log the results to the pipeline's run."""
    model, names, _, images, labels, probabilities = score_test_split(cfg, paths)
    metrics = classification_metrics(
        labels, probabilities, names, cfg.evaluate.top_k, cfg.evaluate.calibration_bins
    )
    metrics["latency_ms_per_image"] = latency_ms(model, images, cfg.evaluate.latency_images)
    if cfg.train.distill is not None:
        metrics["distillation"] = distillation_comparison(cfg, paths, model, names, labels)
    write_reports(metrics, labels, probabilities, names, paths)
    with tracking.resume_run(cfg.mlflow, paths):
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items() if isinstance(v, float)})
        if "distillation" in metrics:
            compared = metrics["distillation"]
            mlflow.log_metrics(
                {
                    f"distill_{who}_{k}": float(v)
                    for who in ("teacher", "student")
                    for k, v in compared[who].items()
                    if isinstance(v, int | float)
                }
            )
        for report in (paths.metrics, paths.confusion_matrix, paths.classification_report):
            mlflow.log_artifact(str(report), "reports")
    if "distillation" in metrics:
        compared = metrics["distillation"]
        log.info(
            "student %.4f vs teacher %s %.4f on the test split; size x%.3f, latency x%.3f",
            compared["student"]["accuracy"],
            compared["teacher"]["uri"],
            compared["teacher"]["accuracy"],
            compared["size_ratio"],
            compared["latency_ratio"],
        )
    log.info(
        "test accuracy %.4f, macro F1 %.4f, ECE %.4f, %.2f ms/image",
        metrics["accuracy"],
        metrics["macro_f1"],
        metrics["expected_calibration_error"],
        metrics["latency_ms_per_image"],
    )
    return EvaluateResult(metrics["accuracy"], metrics["macro_f1"], metrics)

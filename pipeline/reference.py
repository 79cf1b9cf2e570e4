"""reference: the drift reference profile of the trained model, computed on the validation split.

What a new batch is compared with (pipeline.monitoring): per-image
statistics, the model's penultimate-layer embeddings reduced by PCA to a
small fixed dimension, and its softmax outputs. The validation split is
held-out data the weights were never fitted on, so a batch from the same
distribution looks like it. The profile is saved under `paths.reference` and
logged to the pipeline's MLflow run, where the registry finds it for the
champion.
"""

from __future__ import annotations

import logging

import mlflow

from pipeline import tracking
from pipeline.artifacts import image_files, input_size, load_trained_model, read_report, read_split
from pipeline.config import PipelineConfig
from pipeline.monitoring.profile import ReferenceProfile, build_reference
from pipeline.paths import StagePaths
from pipeline.registry import REFERENCE_ARTIFACT

log = logging.getLogger(__name__)


def run(cfg: PipelineConfig, paths: StagePaths) -> ReferenceProfile:
    """Profile the validation split, save it, log it to the pipeline's MLflow run.

    Args:
        cfg: the configuration (`drift.embeddings.dim`, `mlflow`).
        paths: resolved stage paths.

    Returns:
        The reference profile, also written to `paths.reference`.
    """
    model, class_names = load_trained_model(paths)
    val = read_split(paths, "val")
    metrics = read_report(paths.metrics, "evaluate")
    reference = build_reference(
        image_files(val, paths.root),
        list(val["label"]),
        model,
        class_names,
        input_size(model),
        cfg.drift.embeddings.dim,
        float(metrics["accuracy"]),
        int(metrics["test_images"]),
    )
    reference.save(paths.reference)
    with tracking.resume_run(cfg.mlflow, paths):
        mlflow.log_artifacts(str(paths.reference), REFERENCE_ARTIFACT)
    log.info("drift reference: %d validation images -> %s", len(val), paths.relative(paths.reference))
    return reference

"""Drift monitoring: check a batch against the champion's reference, and decide whether to retrain."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import drift, tracking
from pipeline.config import DriftConfig, MlflowConfig
from pipeline.drift import DetectorResult
from pipeline.errors import PipelineError
from pipeline.ingest.images import inspect_image
from pipeline.landing import Batch
from pipeline.profile import REFERENCE_ARTIFACT, STATISTICS, BatchProfile, ReferenceProfile, profile_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Champion:
    """The registry's champion: its model, its drift reference, and when it was registered."""

    name: str
    version: str
    run_id: str
    created: datetime
    model: Any
    reference: ReferenceProfile


def load_champion(cfg: MlflowConfig, root: Path) -> Champion | None:
    """The champion model and its reference profile from the registry, or None when there is none.

    Raises:
        PipelineError: when the champion's run carries no drift reference.
    """
    import mlflow

    from pipeline.gate import champion_version

    tracking.configure(cfg, root)
    version = champion_version(cfg.registered_model)
    if version is None:
        return None
    with tempfile.TemporaryDirectory(prefix="drift-reference-") as scratch:
        try:
            folder = mlflow.artifacts.download_artifacts(
                run_id=version.run_id, artifact_path=REFERENCE_ARTIFACT, dst_path=scratch
            )
            reference = ReferenceProfile.load(Path(folder))
        except (OSError, mlflow.exceptions.MlflowException) as error:
            raise PipelineError(
                f"champion {cfg.registered_model} v{version.version} (run {version.run_id}) has no "
                f"'{REFERENCE_ARTIFACT}' artifact ({error.__class__.__name__}); retrain it with this "
                "version of the pipeline so the reference stage records one"
            ) from None
    model = mlflow.tensorflow.load_model(f"models:/{cfg.registered_model}/{version.version}")
    created = datetime.fromtimestamp(version.creation_timestamp / 1000, tz=UTC)
    return Champion(cfg.registered_model, str(version.version), version.run_id, created, model, reference)


def detect(reference: ReferenceProfile, batch: BatchProfile, cfg: DriftConfig) -> list[DetectorResult]:
    """Run every detector that applies; labelled batches get the label and accuracy tests too.

    The family-wise level `cfg.alpha` is split across the detectors that run, by weight.
    """
    ref = reference.profile
    weights = {
        "image_stats": cfg.image_stats.weight,
        "embeddings": cfg.embeddings.weight,
        "softmax": cfg.softmax.weight,
        "predicted_labels": cfg.predicted_labels.weight,
    }
    if batch.labels is not None:
        weights |= {"true_labels": cfg.true_labels.weight, "accuracy": cfg.accuracy.weight}
    alphas = drift.alpha_shares({k: w for k, w in weights.items() if w > 0}, cfg.alpha)
    results = []
    if "image_stats" in alphas:
        results.append(
            drift.feature_tests(
                "image_stats",
                ref.statistics,
                batch.statistics,
                STATISTICS,
                alphas["image_stats"],
                cfg.image_stats.test,
            )
        )
    if "embeddings" in alphas:
        rng = np.random.default_rng(cfg.seed)
        keep = min(len(ref.embeddings), cfg.embeddings.max_reference)
        subset = ref.embeddings[np.sort(rng.choice(len(ref.embeddings), keep, replace=False))]
        results.append(
            drift.mmd_test(
                "embeddings",
                subset,
                batch.embeddings,
                alphas["embeddings"],
                cfg.embeddings.permutations,
                cfg.seed,
            )
        )
    if "softmax" in alphas:
        names = [f"p({c})" for c in reference.class_names]
        results.append(
            drift.feature_tests("softmax", ref.probabilities, batch.probabilities, names, alphas["softmax"])
        )
    if "predicted_labels" in alphas:
        results.append(
            drift.label_shift_test(
                "predicted_labels", ref.predicted, batch.predicted, alphas["predicted_labels"]
            )
        )
    if "true_labels" in alphas and batch.labels is not None and ref.labels is not None:
        results.append(drift.label_shift_test("true_labels", ref.labels, batch.labels, alphas["true_labels"]))
    if "accuracy" in alphas and batch.labels is not None:
        correct = np.array([p == t for p, t in zip(batch.predicted, batch.labels, strict=True)])
        results.append(
            drift.accuracy_test(
                "accuracy", correct, reference.test_accuracy, alphas["accuracy"], cfg.accuracy.min_drop
            )
        )
    return results


@dataclass(frozen=True)
class DriftReport:
    """Everything one check found: every detector's figures, not only the alarms."""

    batch: str
    checked_at: str
    champion: str
    labelled: bool
    images: int
    alpha: float
    drift: bool
    detectors: list[DetectorResult]
    skipped_files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def alarms(self) -> list[str]:
        return [d.name for d in self.detectors if d.drift]


def decodable_files(batch: Batch, max_pixels: int) -> tuple[list[Path], list[str] | None, dict[str, str]]:
    """The batch's images that decode safely, their labels, and why the others were left out."""
    keep, labels, skipped = [], [], {}
    for index, path in enumerate(batch.files):
        row = inspect_image(path.read_bytes(), path.name, "", max_pixels)
        if row.decodable:
            keep.append(path)
            labels.append(batch.labels[index] if batch.labels is not None else "")
        else:
            skipped[str(path.relative_to(batch.path))] = row.error
    for path in batch.ignored:
        skipped[str(path.relative_to(batch.path))] = "not an image file (by extension)"
    return keep, labels if batch.labelled else None, skipped


def check_batch(
    batch: Batch, champion: Champion, cfg: DriftConfig, max_pixels: int
) -> tuple[DriftReport, BatchProfile]:
    """Profile a batch with the champion and run the detectors against its reference.

    Raises:
        PipelineError: when no image in the batch decodes.
    """
    files, labels, skipped = decodable_files(batch, max_pixels)
    if not files:
        raise PipelineError(f"{batch.path}: no decodable images in the batch ({len(skipped)} files skipped)")
    reference = champion.reference
    profile = profile_files(
        files, labels, champion.model, reference.class_names, reference.image_size, reference.projection
    )
    results = detect(reference, profile, cfg)
    report = DriftReport(
        batch=batch.name,
        checked_at=datetime.now(UTC).isoformat(timespec="seconds"),
        champion=f"{champion.name}/{champion.version}",
        labelled=batch.labelled,
        images=len(files),
        alpha=cfg.alpha,
        drift=any(r.drift for r in results),
        detectors=results,
        skipped_files=skipped,
    )
    log.info(
        "batch %s: %s (%s)",
        batch.name,
        "DRIFT" if report.drift else "no drift",
        ", ".join(f"{r.name} p={r.p_value:.3g}{' !' if r.drift else ''}" for r in results),
    )
    return report, profile


@dataclass(frozen=True)
class RetrainDecision:
    """Whether to retrain now, and why (or why not)."""

    retrain: bool
    reason: str
    deferred: bool = False  # drift was found, but the cooldown holds training back


def retrain_decision(
    drifted_batches: int,
    champion_created: datetime,
    last_training: datetime | None,
    now: datetime,
    cfg: DriftConfig,
) -> RetrainDecision:
    """Retrain on drift, or when the champion is too old; never inside the cooldown.

    Args:
        drifted_batches: drifted, labelled batches large enough to train on.
        champion_created: when the champion version was registered.
        last_training: start of the latest training run, if any.
        now: the current time.
        cfg: the `drift` section (cooldown and maximum age).
    """
    cooldown = timedelta(hours=cfg.cooldown_hours)
    if last_training is not None and now - last_training < cooldown:
        return RetrainDecision(
            False,
            f"cooldown: last training started {last_training:%Y-%m-%d %H:%M} UTC, "
            f"next allowed after {last_training + cooldown:%Y-%m-%d %H:%M} UTC",
            deferred=drifted_batches > 0,
        )
    if drifted_batches:
        return RetrainDecision(True, f"drift in {drifted_batches} labelled batch(es)")
    age = now - champion_created
    if age > timedelta(days=cfg.max_model_age_days):
        return RetrainDecision(
            True, f"champion is {age.days} days old (drift.max_model_age_days {cfg.max_model_age_days:g})"
        )
    return RetrainDecision(False, "no drift to train on and the champion is fresh")


def last_training_start(cfg: MlflowConfig, root: Path) -> datetime | None:
    """Start time of the latest run in the training experiment."""
    import mlflow

    tracking.configure(cfg, root)
    runs = mlflow.search_runs(
        experiment_names=[cfg.experiment], max_results=1, order_by=["start_time DESC"], output_format="list"
    )
    return datetime.fromtimestamp(runs[0].info.start_time / 1000, tz=UTC) if runs else None

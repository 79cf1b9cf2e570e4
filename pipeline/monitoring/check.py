"""One drift check: a batch against the champion's reference profile, with every detector that applies."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import registry, tracking
from pipeline.config import DriftConfig, MlflowConfig
from pipeline.errors import PipelineError
from pipeline.ingest.images import inspect_image
from pipeline.monitoring import detectors
from pipeline.monitoring.detectors import DetectorResult
from pipeline.monitoring.landing import Batch
from pipeline.monitoring.profile import STATISTICS, BatchProfile, ReferenceProfile, profile_files

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
    tracking.configure(cfg, root)
    entry = registry.champion(cfg.registered_model)
    if entry is None:
        return None
    with registry.drift_reference(entry) as folder:
        reference = ReferenceProfile.load(folder)
    return Champion(
        entry.name, entry.version, entry.run_id, entry.created, registry.load_model(entry), reference
    )


Detector = Callable[[ReferenceProfile, BatchProfile, DriftConfig, float], DetectorResult]


def _image_stats(reference: ReferenceProfile, batch: BatchProfile, cfg: DriftConfig, alpha: float):
    return detectors.feature_tests(
        "image_stats", reference.profile.statistics, batch.statistics, STATISTICS, alpha, cfg.image_stats.test
    )


def _embeddings(reference: ReferenceProfile, batch: BatchProfile, cfg: DriftConfig, alpha: float):
    embeddings = reference.profile.embeddings
    keep = min(len(embeddings), cfg.embeddings.max_reference)  # a random subset keeps a check fast
    subset = embeddings[np.sort(np.random.default_rng(cfg.seed).choice(len(embeddings), keep, replace=False))]
    return detectors.mmd_test(
        "embeddings", subset, batch.embeddings, alpha, cfg.embeddings.permutations, cfg.seed
    )


def _softmax(reference: ReferenceProfile, batch: BatchProfile, cfg: DriftConfig, alpha: float):
    names = [f"p({c})" for c in reference.class_names]
    return detectors.feature_tests(
        "softmax", reference.profile.probabilities, batch.probabilities, names, alpha
    )


def _predicted_labels(reference: ReferenceProfile, batch: BatchProfile, cfg: DriftConfig, alpha: float):
    return detectors.label_shift_test("predicted_labels", reference.profile.predicted, batch.predicted, alpha)


def _true_labels(reference: ReferenceProfile, batch: BatchProfile, cfg: DriftConfig, alpha: float):
    assert reference.profile.labels is not None and batch.labels is not None  # labelled detectors only
    return detectors.label_shift_test("true_labels", reference.profile.labels, batch.labels, alpha)


def _accuracy(reference: ReferenceProfile, batch: BatchProfile, cfg: DriftConfig, alpha: float):
    assert batch.labels is not None  # labelled detectors only
    correct = np.array([p == t for p, t in zip(batch.predicted, batch.labels, strict=True)])
    return detectors.accuracy_test(
        "accuracy", correct, reference.test_accuracy, alpha, cfg.accuracy.min_drop, reference.test_images
    )


# name (also its section of the `drift` config) -> (needs labels, detector); in report order.
DETECTORS: dict[str, tuple[bool, Detector]] = {
    "image_stats": (False, _image_stats),
    "embeddings": (False, _embeddings),
    "softmax": (False, _softmax),
    "predicted_labels": (False, _predicted_labels),
    "true_labels": (True, _true_labels),
    "accuracy": (True, _accuracy),
}


def detect(reference: ReferenceProfile, batch: BatchProfile, cfg: DriftConfig) -> list[DetectorResult]:
    """Run every detector that applies; labelled batches get the label and accuracy tests too.

    The family-wise level `cfg.alpha` is split across the detectors that run, by weight.
    """
    labelled = batch.labels is not None and reference.profile.labels is not None
    weights = {
        name: getattr(cfg, name).weight
        for name, (needs_labels, _) in DETECTORS.items()
        if labelled or not needs_labels
    }
    alphas = detectors.alpha_shares({k: w for k, w in weights.items() if w > 0}, cfg.alpha)
    return [DETECTORS[name][1](reference, batch, cfg, alpha) for name, alpha in alphas.items()]


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
    quality: dict[str, Any] = field(default_factory=dict)  # the service's live figures, for this batch

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


def class_shares(labels: list[str]) -> dict[str, float]:
    """Each class's share of `labels`, by class name."""
    counts = Counter(labels)
    return {name: round(count / len(labels), 6) for name, count in sorted(counts.items())} if labels else {}


def share_distance(a: dict[str, float], b: dict[str, float]) -> float:
    """Total variation distance between two class distributions (0 same, 1 disjoint)."""
    return round(0.5 * sum(abs(a.get(c, 0.0) - b.get(c, 0.0)) for c in set(a) | set(b)), 6)


def batch_quality(profile: BatchProfile, reference: ReferenceProfile) -> dict[str, Any]:
    """The figures the service reports live, on one batch: accuracy (labelled), mean top-1 confidence,
    predicted-class shares against training's (the reference's validation labels: a stratified split)."""
    predicted = class_shares(list(profile.predicted))
    training = class_shares(list(reference.profile.labels or []))
    accuracy = None
    if profile.labels is not None:
        accuracy = float(np.mean([p == t for p, t in zip(profile.predicted, profile.labels, strict=True)]))
    return {
        "accuracy": accuracy,
        "labelled": len(profile.labels) if profile.labels is not None else 0,
        "mean_confidence": round(float(profile.probabilities.max(axis=1).mean()), 6),
        "reference_test_accuracy": reference.test_accuracy,
        "predicted_class_share": predicted,
        "training_class_share": training,
        "class_share_distance": share_distance(predicted, training) if training else None,
    }


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
        quality=batch_quality(profile, reference),
    )
    log.info(
        "batch %s: %s (%s)",
        batch.name,
        "DRIFT" if report.drift else "no drift",
        ", ".join(f"{r.name} p={r.p_value:.3g}{' !' if r.drift else ''}" for r in results),
    )
    return report, profile

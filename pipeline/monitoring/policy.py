"""The retraining policy: what happens to a checked batch, and whether to retrain now.

Pure decisions: the drift-check flow moves the files, alerts people and runs
the training flow on what is decided here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pipeline import tracking
from pipeline.config import DriftConfig, MlflowConfig
from pipeline.monitoring.check import DriftReport
from pipeline.monitoring.landing import AWAITING_LABELS, PROCESSED


@dataclass(frozen=True)
class Triage:
    """Where a checked batch goes: into training, or aside to an archive folder (and whether to alert)."""

    outcome: str
    archive: str | None  # the archive subfolder to move the batch to; None: keep it to train on
    alert: str | None = None  # a message for people

    @property
    def trainable(self) -> bool:
        return self.archive is None


def triage(report: DriftReport, cfg: DriftConfig) -> Triage:
    """Train on drifted labelled batches that are large enough; set the others aside.

    Args:
        report: the batch's drift check.
        cfg: the `drift` section (`min_batch_images`).
    """
    if not report.drift:
        return Triage("no drift", PROCESSED)
    alarms = ", ".join(report.alarms)
    if not report.labelled:
        return Triage(
            f"drift ({alarms}), unlabelled: awaiting labels",
            AWAITING_LABELS,
            f"drift ({alarms}) in an unlabelled batch; kept for labelling",
        )
    if report.images < cfg.min_batch_images:
        return Triage(
            f"drift ({alarms}), too small to train on",
            PROCESSED,
            f"drift ({alarms}) but only {report.images} images (drift.min_batch_images "
            f"{cfg.min_batch_images}); not trained on",
        )
    return Triage(f"drift ({alarms})", None)


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

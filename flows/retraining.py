"""The drift-check flow: check new batches against the champion's reference, retrain when they drifted.

Scheduled by the `drift-check` deployment (flows/deployments.py). Each run:

1. takes the landing-area lock (a second run at the same time returns at once);
2. loads the champion and its drift reference from the MLflow registry, and
   pulls settled batches from the S3 landing area when one is configured;
3. checks every settled batch in the landing area, writing
   `reports/drift/<batch>.json|html`, an MLflow monitoring run and a Prefect artifact;
4. moves batches that did not drift to `<archive>/processed/`, and drifted
   unlabelled ones to `<archive>/awaiting_labels/` with an alert;
5. when labelled batches drifted (and are large enough), or the champion is
   older than the maximum age, and the cooldown has passed: versions the
   batches with DVC into the training data and runs the training flow, whose
   gate decides promotion. The batches are moved aside only after that, so a
   run that fails midway leaves them for the next schedule.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.events import emit_event

from flows import artifacts
from flows.locks import file_lock
from flows.training import PROJECT_ROOT, training_flow, transient_only
from pipeline import drift_report, landing, monitor, s3
from pipeline.config import PipelineConfig, StagePaths, load_config, parse_config, with_overrides
from pipeline.errors import ConfigError, GateFailed, PipelineError


def artifact_key(text: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "batch"


def drift_config(project: Path, overrides: dict[str, Any] | None) -> PipelineConfig:
    """params.yaml with in-memory overrides for this check only (params.yaml is not changed).

    Raises:
        ConfigError: when an override is not a `drift.` key or fails validation.
    """
    params = project / "params.yaml"
    cfg = load_config(params, project)
    if not overrides:
        return cfg
    outside = [key for key in overrides if not key.startswith("drift.")]
    if outside:
        raise ConfigError(f"drift-check overrides may only set drift.* keys, not {outside}")
    return parse_config(with_overrides(cfg.model_dump(by_alias=True, mode="json"), overrides), params)


@task(retries=2, retry_delay_seconds=[5, 15], retry_condition_fn=transient_only, cache_policy=NONE)
def load_champion(cfg: PipelineConfig, project: Path) -> monitor.Champion | None:
    """The champion and its drift reference (registry I/O: retried)."""
    return monitor.load_champion(cfg.mlflow, project)


@task(retries=2, retry_delay_seconds=[5, 15], retry_condition_fn=transient_only, cache_policy=NONE)
def pull_landing(location: s3.S3Location, landing_dir: Path, cfg: PipelineConfig) -> list[str]:
    """Pull the settled batches of the S3 landing area into the local one (S3 I/O: retried)."""
    return landing.pull_s3_batches(location, landing_dir, cfg.drift.settle_seconds, cfg.storage)


@task(cache_policy=NONE)
def check_batch(
    path: Path, champion: monitor.Champion, cfg: PipelineConfig, paths: StagePaths
) -> monitor.DriftReport:
    """Run the detectors on one batch; write its JSON and HTML reports and a Prefect artifact."""
    batch = landing.read_batch(path)
    report, profile = monitor.check_batch(batch, champion, cfg.drift, cfg.ingest.max_pixels)
    files = drift_report.write_reports(report, champion.reference, profile, paths.reports / "drift")
    create_markdown_artifact(
        artifacts.drift_markdown(report.to_dict()),
        key=f"drift-{artifact_key(batch.name)}",
        description=f"drift check of {batch.name} ({files[1].relative_to(paths.root)})",
    )
    log_monitoring_run(report, files, cfg, paths.root)
    return report


@task(retries=2, retry_delay_seconds=[5, 15], retry_condition_fn=transient_only, cache_policy=NONE)
def log_monitoring_run(
    report: monitor.DriftReport, files: tuple[Path, Path], cfg: PipelineConfig, root: Path
) -> str:
    """The check's MLflow run in the drift-monitoring experiment (tracking I/O: retried)."""
    return drift_report.log_monitoring_run(report, files, cfg.mlflow, root)


def alert(batch: str, message: str, report: monitor.DriftReport | None = None) -> None:
    """Tell people: a warning in the flow log, an artifact, and a Prefect event automations can act on."""
    get_run_logger().warning("drift alert for batch %s: %s", batch, message)
    create_markdown_artifact(
        f"# Drift alert: `{batch}`\n\n{message}", key=f"drift-alert-{artifact_key(batch)}"
    )
    emit_event(
        event="image-pipeline.drift.alert",
        resource={"prefect.resource.id": f"image-pipeline.batch.{batch}"},
        payload={"message": message, "detectors": report.alarms if report else []},
    )


@task(retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=transient_only, cache_policy=NONE)
def accept_batch(path: Path, paths: StagePaths) -> str:
    """Copy the batch into the training data and `dvc add` it (file I/O: retried)."""
    return str(landing.accept(landing.read_batch(path), paths.batches, paths.root).relative_to(paths.root))


def triage(path: Path, report: monitor.DriftReport, cfg: PipelineConfig, archive: Path) -> tuple[str, bool]:
    """Move a checked batch aside unless it should train; returns (outcome, usable for training)."""
    if not report.drift:
        landing.move_aside(path, archive, landing.PROCESSED)
        return "no drift", False
    alarms = ", ".join(report.alarms)
    if not report.labelled:
        target = landing.move_aside(path, archive, landing.AWAITING_LABELS)
        alert(path.name, f"drift ({alarms}) in an unlabelled batch; kept at {target} for labelling", report)
        return f"drift ({alarms}), unlabelled: awaiting labels", False
    if report.images < cfg.drift.min_batch_images:
        target = landing.move_aside(path, archive, landing.PROCESSED)
        alert(
            path.name,
            f"drift ({alarms}) but only {report.images} images (drift.min_batch_images "
            f"{cfg.drift.min_batch_images}); not trained on, kept at {target}",
            report,
        )
        return f"drift ({alarms}), too small to train on", False
    return f"drift ({alarms})", True


def retrain(project: Path, usable: list[Path], paths: StagePaths, archive: Path, logger: Any) -> str:
    """Version the batches into the training data, run the training flow, report the gate's verdict."""
    for path in usable:
        logger.info("batch %s -> training data (%s)", path.name, accept_batch(path, paths))
    # Without new batches (maximum age) nothing changed for DVC: force ingest and train.
    force = None if usable else ["ingest", "train"]
    try:
        training_flow(root=str(project), force=force)
        registered = json.loads(paths.report("register.json").read_text())
        verdict = f"gate passed: {registered['model_name']} v{registered['version']} is the new champion"
    except GateFailed as error:
        verdict = f"gate failed, champion unchanged: {error}"
    for path in usable:
        landing.move_aside(path, archive, landing.PROCESSED)
    return verdict


@flow(name="drift-check", log_prints=True)
def drift_check_flow(
    root: str | None = None,
    settle_seconds: float | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Check the landing area for drift; retrain, gate and promote when it is found.

    Args:
        root: the project root (default: this repository).
        settle_seconds: override `drift.settle_seconds` (a demo writes and checks at once).
        overrides: `drift.*` params as dotted keys, for this check only.

    Returns:
        A summary: status, champion, what happened to each batch, the decision and the training verdict.
    """
    logger = get_run_logger()
    project = Path(root).resolve() if root else PROJECT_ROOT
    if settle_seconds is not None:
        overrides = {**(overrides or {}), "drift.settle_seconds": settle_seconds}
    cfg = drift_config(project, overrides)
    paths = StagePaths.from_config(cfg.paths, project)
    landing_dir, archive = project / cfg.drift.landing, project / cfg.drift.archive
    summary: dict[str, Any] = {"status": "checked", "batches": {}}
    with file_lock(landing_dir / ".drift-check.lock", wait=False) as held:
        if not held:
            logger.warning("another drift check is running on %s; this one does nothing", landing_dir)
            return {**summary, "status": "skipped: another drift check holds the lock"}
        champion = load_champion(cfg, project)
        if champion is None:
            logger.warning("no champion in the registry yet: run the training flow first")
            return {**summary, "status": "skipped: no champion"}
        summary["champion"] = f"{champion.name} v{champion.version}"
        bucket = s3.resolve_uri(cfg.drift.landing_s3, s3.LANDING_URI_ENV, "drift.landing_s3")
        if bucket is not None:
            summary["pulled_from_s3"] = pull_landing(bucket, landing_dir, cfg)
            logger.info("pulled %d batches from %s", len(summary["pulled_from_s3"]), bucket)
        usable = []
        for path in landing.ready_batches(landing_dir, cfg.drift.settle_seconds):
            try:
                report = check_batch(path, champion, cfg, paths)
            except PipelineError as error:  # a malformed batch fails the same way every time
                target = landing.move_aside(path, archive, "rejected")
                alert(path.name, f"{error}; moved to {target}")
                summary["batches"][path.name] = f"rejected: {error}"
                continue
            outcome, trainable = triage(path, report, cfg, archive)
            summary["batches"][path.name] = outcome
            if trainable:
                usable.append(path)
        decision = monitor.retrain_decision(
            len(usable),
            champion.created,
            monitor.last_training_start(cfg.mlflow, project),
            datetime.now(UTC),
            cfg.drift,
        )
        summary["decision"] = decision.reason
        logger.info("decision: %s", decision.reason)
        if decision.deferred:
            for path in usable:
                summary["batches"][path.name] += "; kept in the landing area until the cooldown ends"
        if decision.retrain:
            summary["training"] = retrain(project, usable, paths, archive, logger)
            logger.info("training: %s", summary["training"])
    create_markdown_artifact(artifacts.retraining_markdown(summary), key="drift-check-summary")
    return summary


def main() -> None:
    """`python -m flows.retraining`: one drift check of the landing area, now."""
    try:
        summary = drift_check_flow()
    except PipelineError as error:
        raise SystemExit(f"error: {error}") from None
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

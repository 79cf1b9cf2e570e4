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
from pipeline import s3
from pipeline.artifacts import read_report
from pipeline.config import PipelineConfig, load_with_section_overrides
from pipeline.errors import GateFailed, PipelineError
from pipeline.logs import quiet_libraries
from pipeline.monitoring import check, landing, policy
from pipeline.monitoring import report as drift_report
from pipeline.paths import StagePaths


def artifact_key(text: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "batch"


@task(retries=2, retry_delay_seconds=[5, 15], retry_condition_fn=transient_only, cache_policy=NONE)
def load_champion(cfg: PipelineConfig, project: Path) -> check.Champion | None:
    """The champion and its drift reference (registry I/O: retried)."""
    return check.load_champion(cfg.mlflow, project)


@task(retries=2, retry_delay_seconds=[5, 15], retry_condition_fn=transient_only, cache_policy=NONE)
def pull_landing(location: s3.S3Location, landing_dir: Path, cfg: PipelineConfig) -> list[str]:
    """Pull the settled batches of the S3 landing area into the local one (S3 I/O: retried)."""
    return landing.pull_s3_batches(location, landing_dir, cfg.drift.settle_seconds, cfg.storage)


@task(cache_policy=NONE)
def check_batch(
    path: Path, champion: check.Champion, cfg: PipelineConfig, paths: StagePaths
) -> check.DriftReport:
    """Run the detectors on one batch; write its JSON and HTML reports and a Prefect artifact."""
    batch = landing.read_batch(path)
    report, profile = check.check_batch(batch, champion, cfg.drift, cfg.ingest.max_pixels)
    files = drift_report.write_reports(report, champion.reference, profile, paths.drift_reports)
    create_markdown_artifact(
        artifacts.drift_markdown(report.to_dict()),
        key=f"drift-{artifact_key(batch.name)}",
        description=f"drift check of {batch.name} ({files[1].relative_to(paths.root)})",
    )
    log_monitoring_run(report, files, cfg, paths.root)
    return report


@task(retries=2, retry_delay_seconds=[5, 15], retry_condition_fn=transient_only, cache_policy=NONE)
def log_monitoring_run(
    report: check.DriftReport, files: tuple[Path, Path], cfg: PipelineConfig, root: Path
) -> str:
    """The check's MLflow run in the drift-monitoring experiment (tracking I/O: retried)."""
    return drift_report.log_monitoring_run(report, files, cfg.mlflow, root)


def alert(batch: str, message: str, report: check.DriftReport | None = None) -> None:
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


def set_aside(path: Path, report: check.DriftReport, cfg: PipelineConfig, archive: Path) -> tuple[str, bool]:
    """Act on the policy's triage: move the batch aside (alerting when it says so) unless it trains."""
    decided = policy.triage(report, cfg.drift)
    if decided.archive is not None:
        target = landing.move_aside(path, archive, decided.archive)
        if decided.alert:
            alert(path.name, f"{decided.alert}; moved to {target}", report)
    return decided.outcome, decided.trainable


def retrain(project: Path, usable: list[Path], paths: StagePaths, archive: Path, logger: Any) -> str:
    """Version the batches into the training data, run the training flow, report the gate's verdict."""
    for path in usable:
        logger.info("batch %s -> training data (%s)", path.name, accept_batch(path, paths))
    # Without new batches (maximum age) nothing changed for DVC: force ingest and train.
    force = None if usable else ["ingest", "train"]
    try:
        training_flow(root=str(project), force=force)
        registered = read_report(paths.register_report, "register")
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
    quiet_libraries()
    project = Path(root).resolve() if root else PROJECT_ROOT
    if settle_seconds is not None:
        overrides = {**(overrides or {}), "drift.settle_seconds": settle_seconds}
    cfg = load_with_section_overrides(project, overrides, "drift", "drift-check")
    paths = StagePaths.from_config(cfg.paths, project)
    landing_dir, archive = paths.resolve(cfg.drift.landing), paths.resolve(cfg.drift.archive)
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
        if cfg.drift.landing_s3:
            bucket = s3.parse_uri(cfg.drift.landing_s3, "drift.landing_s3")
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
            outcome, trainable = set_aside(path, report, cfg, archive)
            summary["batches"][path.name] = outcome
            if trainable:
                usable.append(path)
        decision = policy.retrain_decision(
            len(usable),
            champion.created,
            policy.last_training_start(cfg.mlflow, project),
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
    from flows.server import temporary_server  # Prefect's server code loads for this entry point only

    try:
        with temporary_server():  # when no Prefect server is configured; it ends with this process
            summary = drift_check_flow()
    except PipelineError as error:
        raise SystemExit(f"error: {error}") from None
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""`make drift-demo`: land a brightened, labelled batch of digits and run the drift-check flow once.

Needs a champion (`make run` first; the Makefile target does that). The batch
is the test split with brightness +0.3, so the detectors fire, the batch is
versioned into the training data, the training flow runs, and its gate
decides whether the retrained model becomes champion.
"""

from __future__ import annotations

from datetime import UTC, datetime

from flows.retraining import drift_check_flow
from flows.training import PROJECT_ROOT
from pipeline.artifacts import image_files, read_report, read_split
from pipeline.config import load_config
from pipeline.monitoring.report import report_files
from pipeline.monitoring.shifts import brightness, write_batch
from pipeline.paths import StagePaths


def main() -> None:
    """Write the batch, check it (cooldown off for the demo), print what happened."""
    from flows.server import temporary_server  # Prefect's server code loads for this entry point only

    cfg = load_config(PROJECT_ROOT / "params.yaml", PROJECT_ROOT)
    paths = StagePaths.from_config(cfg.paths, PROJECT_ROOT)
    test = read_split(paths, "test")
    name = f"demo-brightness-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    batch = write_batch(
        image_files(test, paths.root),
        list(test["label"]),
        paths.resolve(cfg.drift.landing) / name,
        brightness(0.3),
        seed=0,
    )
    print(f"landed {len(test)} labelled images, brightness +0.3, at {batch.relative_to(PROJECT_ROOT)}")
    with temporary_server():  # when no Prefect server is configured; it ends with this process
        summary = drift_check_flow(settle_seconds=0, overrides={"drift.cooldown_hours": 0})
    report = read_report(report_files(paths.drift_reports, name)[0], "drift-check")
    print(f"\ndrift check of {name}: {'DRIFT' if report['drift'] else 'no drift'}")
    for detector in report["detectors"]:
        print(
            f"  {detector['name']:17s} statistic {detector['statistic']:9.4g}  p {detector['p_value']:9.3g}"
            f"  threshold {detector['threshold']:.4f}  {'DRIFT' if detector['drift'] else 'ok'}"
        )
    print(f"batch:    {summary['batches'].get(name)}")
    print(f"decision: {summary.get('decision')}")
    print(f"training: {summary.get('training', 'none')}")
    print(
        f"reports:  reports/drift/{name}.html, MLflow experiment '{cfg.mlflow.experiment}-drift-monitoring'"
    )


if __name__ == "__main__":
    main()

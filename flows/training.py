"""The training flow: the stage graph as Prefect tasks, each running the stage function the CLI runs.

Run it with `python -m flows.training` (what `make run` does) or through the
`training` deployment (see flows/deployments.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

import pipeline.logs  # noqa: F401, I001  (first: TensorFlow's log threshold is read when it loads)
from flows import artifacts
from flows.locks import file_lock
from flows.stages import run_stage, save_experiment
from pipeline import tracking
from pipeline.config import load_config, parse_config, with_overrides
from pipeline.errors import PipelineError
from pipeline.paths import StagePaths
from pipeline.stages import STAGE_NAMES

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Retries only where a retry can help: I/O and tracking-server calls. A failed
# validation, split or gate fails the same way every time. A retried train
# resumes from its BackupAndRestore state instead of starting over.
RETRIES = {"ingest": 2, "train": 1, "evaluate": 2, "reference": 2, "export": 2, "register": 3}


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry unexpected errors (a dropped connection, a full disk), never the pipeline's own verdicts.

    A ConfigError, DataValidationError or GateFailed says the same thing on every try.
    """
    try:
        state.result()
    except PipelineError:
        return False
    except Exception:
        return True
    return False


STAGE_TASKS = {
    stage: task(
        run_stage,
        name=stage,
        retries=RETRIES.get(stage, 0),
        retry_delay_seconds=[2, 5, 15][: RETRIES.get(stage, 0)] or 0,
        retry_condition_fn=transient_only,
    )
    for stage in STAGE_NAMES
}

REPORT_ARTIFACTS = {
    # stage: (its report, a StagePaths attribute; the artifact key; the markdown)
    "validate": ("validation_report", "validation", artifacts.validation_markdown),
    "split": ("split_report", "split-counts", artifacts.split_markdown),
    "evaluate": ("metrics", "test-metrics", artifacts.metrics_markdown),
    "robustness": ("robustness_report", "robustness", artifacts.robustness_markdown),
    "export": ("export_report", "export-table", artifacts.export_markdown),
    "gate": ("gate_report", "gate-checks", artifacts.gate_markdown),
}


def write_overrides(params_file: Path, overrides: dict[str, Any]) -> None:
    """Write overrides into params.yaml, keeping its comments (as `dvc exp run --set-param` does).

    Raises:
        ConfigError: when an override names an unknown key or fails validation.
    """
    from ruamel.yaml import YAML

    yaml = YAML()
    document = yaml.load(params_file.read_text(encoding="utf-8"))
    parse_config(with_overrides(json.loads(json.dumps(document)), overrides), params_file)
    for dotted, value in overrides.items():
        node = document
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    with params_file.open("w", encoding="utf-8") as handle:
        yaml.dump(document, handle)


@contextmanager
def run_scoped_params(params_file: Path, overrides: dict[str, Any]) -> Iterator[None]:
    """params.yaml with the overrides for the block only; afterwards it is byte for byte as before.

    DVC's status and lock, the stages and the MLflow run all read params.yaml,
    so during the run they all see (and record) the overridden values; the next
    run without overrides finds the committed ones again, and `dvc status`
    reports the stages whose outputs came from the override.
    """
    if not overrides:
        yield
        return
    committed = params_file.read_bytes()
    try:
        write_overrides(params_file, overrides)
        yield
    finally:
        params_file.write_bytes(committed)


def record_override_run(root: Path, overrides: dict[str, Any], experiment: str) -> None:
    """Tag the run's MLflow run with the overrides and the DVC experiment that holds its state."""
    cfg = load_config(root / "params.yaml", root)
    paths = StagePaths.from_config(cfg.paths, root)
    if not paths.run_file.is_file():
        return
    with tracking.resume_run(cfg.mlflow, paths):
        import mlflow

        mlflow.set_tags(
            {"pipeline.overrides": json.dumps(overrides, sort_keys=True), "dvc.experiment": experiment}
        )


def publish_report(stage: str, root: Path) -> None:
    """Publish the stage's report as a markdown artifact of the flow run."""
    name, key, render = REPORT_ARTIFACTS[stage]
    cfg = load_config(root / "params.yaml", root)
    report: Path = getattr(StagePaths.from_config(cfg.paths, root), name)
    if report.is_file():
        create_markdown_artifact(
            render(json.loads(report.read_text())),
            key=key,
            description=f"{stage} report ({report.relative_to(root)})",
        )


def publish_mlflow_link(root: Path) -> str | None:
    """A link artifact to the pipeline's MLflow run."""
    cfg = load_config(root / "params.yaml", root)
    run_file = StagePaths.from_config(cfg.paths, root).run_file
    if not run_file.is_file():
        return None
    run = json.loads(run_file.read_text())
    return publish_run_link(run["experiment_id"], run["run_id"], "mlflow-run")


def publish_run_link(experiment_id: str, run_id: str, key: str) -> str:
    """A link artifact to an MLflow run in the UI of the tracking server (or of the local store)."""
    server = os.environ.get("MLFLOW_TRACKING_URI", "")
    base = server if server.startswith("http") else "http://127.0.0.1:5000"
    link = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    create_link_artifact(
        link,
        link_text=f"MLflow run {run_id}",
        key=key,
        description="Local store: start the UI with "
        "`mlflow ui --backend-store-uri sqlite:///mlflow.db` first."
        if not server
        else "",
    )
    return link


def requested_overrides(epochs: int | None, model: str | None, overrides: dict[str, Any] | None) -> dict:
    """Flow parameters as dotted params keys."""
    merged = dict(overrides or {})
    if epochs is not None:
        merged["train.epochs"] = epochs
    if model is not None:
        merged["train.model"] = model
    return merged


@flow(name="training", log_prints=True)
def training_flow(
    epochs: int | None = None,
    model: str | None = None,
    overrides: dict[str, Any] | None = None,
    root: str | None = None,
    force: list[str] | None = None,
) -> dict[str, str]:
    """The stage graph: ingest, validate, split, baseline, train, evaluate, reference, robustness, explain,
    export, gate, register.

    Two runs on one project never overlap: the second waits for the first,
    then finds its stages up to date.

    Args:
        epochs: override `train.epochs`.
        model: override `train.model`.
        overrides: any other params as dotted keys, e.g. {"split.seed": 7}.
        root: the project root (default: this repository).
        force: stages to run even when DVC says they are up to date (as `dvc repro --force`).

    Returns:
        Each stage's outcome: 'ran' or 'skipped' (up to date in DVC).
    """
    logger = get_run_logger()
    pipeline.logs.quiet_libraries()
    project = Path(root).resolve() if root else PROJECT_ROOT
    requested = requested_overrides(epochs, model, overrides)
    outcome: dict[str, str] = {}
    experiment = f"override-{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
    with (
        file_lock(project / ".cache" / "training.lock", wait=True),
        run_scoped_params(project / "params.yaml", requested),
    ):
        if requested:
            logger.info("overrides for this run only: %s (DVC experiment %s)", requested, experiment)
        try:
            run_stages(project, force or [], outcome)
        finally:  # an override run that failed at the gate is recorded too
            if requested and outcome:
                recorded = save_experiment(project, experiment)
                record_override_run(project, requested, recorded)
    logger.info("stages: %s", outcome)
    return outcome


def run_stages(project: Path, force: list[str], outcome: dict[str, str]) -> None:
    """Every stage in registry order; `outcome` collects 'ran' or 'skipped' as they finish."""
    # A tracking server that is down fails the flow now, not after ingest and training.
    cfg = load_config(project / "params.yaml", project)
    tracking.check_server(tracking.tracking_uri(project), cfg.mlflow.connect_timeout_seconds)
    for stage in STAGE_NAMES:
        try:
            outcome[stage] = STAGE_TASKS[stage](stage, project, stage in force)
        finally:  # a failed validation or gate still publishes the report that says why
            if stage in REPORT_ARTIFACTS:
                publish_report(stage, project)
        if stage == "train":
            publish_mlflow_link(project)


def main() -> None:
    """`python -m flows.training`: run the flow once and say where to look."""
    from flows.server import temporary_server  # Prefect's server code loads for this entry point only

    try:
        with temporary_server():  # when no Prefect server is configured; it ends with this process
            outcome = training_flow()
    except PipelineError as error:
        raise SystemExit(f"error: {error}") from None
    ran = [stage for stage, state in outcome.items() if state == "ran"]
    print(f"\nstages run: {', '.join(ran) or 'none (everything up to date)'}")
    print(
        "reports:    reports/ (metrics.json, gate.json, export.json, robustness.json, explain/index.html, "
        "validation.json, data_docs/index.html)"
    )
    uri = tracking.tracking_uri(PROJECT_ROOT)
    if uri.startswith("http"):
        print(f"MLflow UI:  {uri}")
    else:
        print(
            "MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   -> http://127.0.0.1:5000"
        )
    print(
        "Prefect UI: .venv/bin/prefect server start                                -> http://127.0.0.1:4200"
    )


if __name__ == "__main__":
    main()

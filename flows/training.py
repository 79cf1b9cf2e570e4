"""The training flow: the stage graph as Prefect tasks, each running the stage function the CLI runs.

Run it with `python -m flows.training` (what `make run` does) or through the
`training` deployment (see flows/deployments.py).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault(
    "TF_CPP_MIN_LOG_LEVEL", "2"
)  # before TensorFlow loads: silence its C++ start-up chatter
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from flows import artifacts
from flows.locks import file_lock
from flows.stages import STAGE_ORDER, run_stage
from pipeline import tracking
from pipeline.config import load_config, parse_config, with_overrides
from pipeline.errors import PipelineError

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
    for stage in STAGE_ORDER
}

REPORT_ARTIFACTS = {
    "validate": ("validation.json", "validation", artifacts.validation_markdown),
    "split": ("split.json", "split-counts", artifacts.split_markdown),
    "evaluate": ("metrics.json", "test-metrics", artifacts.metrics_markdown),
    "export": ("export.json", "export-table", artifacts.export_markdown),
    "gate": ("gate.json", "gate-checks", artifacts.gate_markdown),
}


def apply_overrides(params_file: Path, overrides: dict[str, Any]) -> None:
    """Write flow-parameter overrides into params.yaml, keeping its comments.

    Like `dvc exp run --set-param`, the override lands in params.yaml, so DVC,
    the stages and the MLflow run all see (and record) the same values.

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


def publish_report(stage: str, root: Path) -> None:
    """Publish the stage's report as a markdown artifact of the flow run."""
    name, key, render = REPORT_ARTIFACTS[stage]
    cfg = load_config(root / "params.yaml", root)
    report = root / cfg.paths.reports / name
    if report.is_file():
        create_markdown_artifact(
            render(json.loads(report.read_text())),
            key=key,
            description=f"{stage} report ({report.relative_to(root)})",
        )


def publish_mlflow_link(root: Path) -> str | None:
    """A link artifact to the pipeline's MLflow run."""
    cfg = load_config(root / "params.yaml", root)
    run_file = root / cfg.paths.models / "mlflow_run.json"
    if not run_file.is_file():
        return None
    run = json.loads(run_file.read_text())
    server = os.environ.get("MLFLOW_TRACKING_URI", "")
    base = server if server.startswith("http") else "http://127.0.0.1:5000"
    link = f"{base.rstrip('/')}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}"
    create_link_artifact(
        link,
        link_text=f"MLflow run {run['run_id']}",
        key="mlflow-run",
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
    """The stage graph: ingest, validate, split, baseline, train, evaluate, reference, export, gate, register.

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
    project = Path(root).resolve() if root else PROJECT_ROOT
    requested = requested_overrides(epochs, model, overrides)
    outcome = {}
    with file_lock(project / ".cache" / "training.lock", wait=True):
        if requested:
            apply_overrides(project / "params.yaml", requested)
            logger.info("params.yaml overrides: %s", requested)
        # A tracking server that is down fails the flow now, not after ingest and training.
        cfg = load_config(project / "params.yaml", project)
        tracking.check_server(tracking.tracking_uri(project), cfg.mlflow.connect_timeout_seconds)
        for stage in STAGE_ORDER:
            try:
                outcome[stage] = STAGE_TASKS[stage](stage, project, stage in (force or []))
            finally:  # a failed validation or gate still publishes the report that says why
                if stage in REPORT_ARTIFACTS:
                    publish_report(stage, project)
            if stage == "train":
                publish_mlflow_link(project)
    logger.info("stages: %s", outcome)
    return outcome


def main() -> None:
    """`python -m flows.training`: run the flow once and say where to look."""
    try:
        outcome = training_flow()
    except PipelineError as error:
        raise SystemExit(f"error: {error}") from None
    ran = [stage for stage, state in outcome.items() if state == "ran"]
    print(f"\nstages run: {', '.join(ran) or 'none (everything up to date)'}")
    print(
        "reports:    reports/ (metrics.json, gate.json, export.json, validation.json, data_docs/index.html)"
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

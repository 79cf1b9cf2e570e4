"""The tuning flow: `pipeline.tune.run` as a Prefect task, with the study's best trial as artifacts.

Run it through the `tuning` deployment (flows/deployments.py; no schedule:
`prefect deployment run tuning/tuning`) or `python -m flows.tuning`. Several
runs at once, on workers on several machines, share one study when
`tune.storage` (or PIPELINE_TUNE_STORAGE) names a database they all reach;
each works until the study has `tune.trials` trials. params.yaml is never
changed: the best params are in `reports/tune.patch`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

import pipeline.logs  # noqa: F401, I001  (first: TensorFlow's log threshold is read when it loads)
from flows import artifacts
from flows.training import PROJECT_ROOT, publish_run_link, transient_only
from pipeline.config import PipelineConfig, load_with_section_overrides
from pipeline.errors import PipelineError
from pipeline.paths import StagePaths


# A retry joins the same study and continues it; a pipeline error (missing splits) is not retried.
@task(retries=1, retry_delay_seconds=10, retry_condition_fn=transient_only, cache_policy=NONE)
def tune(cfg: PipelineConfig, paths: StagePaths, params_file: Path) -> dict[str, Any]:
    """Run trials until the study has `tune.trials`; the tune.json report as a dict."""
    from pipeline import tune as tuning  # TensorFlow and Optuna load with the task, not the deployment

    return tuning.run(cfg, paths, params_file).to_dict()


@flow(name="tuning", log_prints=True)
def tuning_flow(root: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """An Optuna study over the train recipe (params.yaml `tune:`), its trials nested MLflow runs.

    Args:
        root: the project root (default: this repository).
        overrides: `tune.*` params for this run only, e.g. {"tune.trials": 50}.

    Returns:
        The study's report (reports/tune.json): trial counts, best trial and params, MLflow run.
    """
    pipeline.logs.quiet_libraries()
    project = Path(root).resolve() if root else PROJECT_ROOT
    cfg = load_with_section_overrides(project, overrides, "tune", "tuning")
    paths = StagePaths.from_config(cfg.paths, project)
    report = tune(cfg, paths, project / "params.yaml")
    create_markdown_artifact(artifacts.tuning_markdown(report), key="tuning-best")
    publish_run_link(report["mlflow_experiment_id"], report["mlflow_parent_run_id"], "tuning-mlflow-run")
    get_run_logger().info("tuning: %s", json.dumps(report["counts"]))
    return report


def main() -> None:
    """`python -m flows.tuning`: one tuning run of this project, now."""
    from flows.server import temporary_server  # Prefect's server code loads for this entry point only

    try:
        with temporary_server():  # when no Prefect server is configured; it ends with this process
            report = tuning_flow()
    except PipelineError as error:
        raise SystemExit(f"error: {error}") from None
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

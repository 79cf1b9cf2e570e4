"""The training run in MLflow: started (or resumed after an interruption) by train, with all it carries.

Stages after train resume the same run through `pipeline.tracking.resume_run`,
so one pipeline execution is one MLflow run.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import tensorflow as tf

from pipeline import tracking
from pipeline.config import PipelineConfig
from pipeline.paths import StagePaths
from pipeline.train.distribute import Distribution
from pipeline.train.models import BuiltModel
from pipeline.train.recipe import Recipe


def start_or_resume_run(
    cfg: PipelineConfig, paths: StagePaths, backup: Path
) -> tuple[mlflow.ActiveRun, bool]:
    """A new MLflow run, or the one an interrupted training of the same job left behind."""
    experiment_id = tracking.configure(cfg.mlflow, paths.root)
    saved = backup / "mlflow_run_id"
    if saved.is_file():
        return mlflow.start_run(run_id=saved.read_text().strip()), True
    run = mlflow.start_run(experiment_id=experiment_id, run_name=f"{cfg.train.model}")
    backup.mkdir(parents=True, exist_ok=True)
    saved.write_text(run.info.run_id)
    return run, False


def log_run_context(
    cfg: PipelineConfig,
    paths: StagePaths,
    splits: dict[str, pd.DataFrame],
    built: BuiltModel,
    dist: Distribution,
    recipe: Recipe,
) -> None:
    """Params (with the recipe's effective values), provenance tags and the dataset inputs."""
    mlflow.log_params({**tracking.flat_params(cfg), **recipe.flat()})
    mlflow.set_tags(
        {
            "mlflow.source.git.commit": tracking.git_commit(paths.root),
            "model": cfg.train.model,
            "weights_source": built.weights_source,
            "devices": ",".join(d.device_type for d in tf.config.list_physical_devices()),
            **dist.describe(),
            **tracking.dvc_data_hashes(paths.root, paths),
        }
    )
    for name, frame in splits.items():
        dataset = mlflow.data.from_pandas(  # type: ignore[attr-defined]
            frame, source=str(paths.split_file(name)), name=name, targets="label"
        )
        mlflow.log_input(dataset, context=name)
    for report in (paths.validation_report, paths.split_report):
        if report.is_file():
            mlflow.log_artifact(str(report), "reports")

"""`python -m pipeline <stage>`: a thin shell over each stage's `run(cfg, paths)`."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.config import PipelineConfig, StagePaths, load_config
from pipeline.errors import PipelineError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run one pipeline stage, as dvc.yaml and the Prefect flow do.",
)

ParamsOption = Annotated[Path, typer.Option("--params", help="params file; its folder is the project root")]


def _configure_logging() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for chatty in ("great_expectations", "absl", "tensorflow"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def _run_stage(params: Path, stage: Callable[[PipelineConfig, StagePaths], Any]) -> Any:
    _configure_logging()
    try:
        cfg = load_config(params)
        return stage(cfg, StagePaths.from_config(cfg.paths, params.resolve().parent))
    except PipelineError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(error.exit_code) from None


@app.command()
def ingest(params: ParamsOption = Path("params.yaml")) -> None:
    """Bring images from the configured source into the raw folder and write the manifest."""
    from pipeline import ingest as stage

    _run_stage(params, lambda cfg, paths: stage.run(cfg.ingest, paths, cfg.storage))


@app.command()
def validate(params: ParamsOption = Path("params.yaml")) -> None:
    """Run the data checks; quarantine bad files; exit non-zero on a blocking failure."""
    from pipeline import validate as stage

    _run_stage(params, lambda cfg, paths: stage.run(cfg.validate_, paths))


@app.command()
def split(params: ParamsOption = Path("params.yaml")) -> None:
    """Write the stratified train/val/test splits."""
    from pipeline import split as stage

    _run_stage(params, lambda cfg, paths: stage.run(cfg.split, paths))


@app.command()
def train(
    params: ParamsOption = Path("params.yaml"),
    workers: Annotated[
        int, typer.Option("--workers", help="start N local workers (MultiWorkerMirroredStrategy)")
    ] = 0,
) -> None:
    """Train the configured model; starts the pipeline's MLflow run."""
    if workers:
        from pipeline.train.launch import launch

        def run_workers(cfg: PipelineConfig, paths: StagePaths) -> dict[str, str]:
            return launch(params, workers, cfg.train.distribution)

        _run_stage(params, run_workers)
        return
    from pipeline import train as stage

    _run_stage(params, stage.run)


@app.command()
def evaluate(params: ParamsOption = Path("params.yaml")) -> None:
    """Score the trained model on the test split."""
    from pipeline import evaluate as stage

    _run_stage(params, stage.run)


@app.command()
def reference(params: ParamsOption = Path("params.yaml")) -> None:
    """Compute the drift reference profile of the trained model on the validation split."""
    from pipeline import profile as stage

    _run_stage(params, stage.run)


@app.command()
def baseline(params: ParamsOption = Path("params.yaml")) -> None:
    """Fit and score the HOG + PCA + SVM baseline."""
    from pipeline import baseline as stage

    _run_stage(params, lambda cfg, paths: stage.run(cfg.baseline, paths))


@app.command()
def export(params: ParamsOption = Path("params.yaml")) -> None:
    """Export SavedModel and TFLite variants and measure them on the test split."""
    from pipeline import export as stage

    _run_stage(params, stage.run)


@app.command()
def gate(params: ParamsOption = Path("params.yaml")) -> None:
    """Check the model against thresholds, the baseline and the registry's champion."""
    from pipeline import gate as stage

    _run_stage(params, stage.run)


@app.command()
def register(params: ParamsOption = Path("params.yaml")) -> None:
    """Register the model in MLflow; alias champion if the gate passed, else challenger (and fail)."""
    from pipeline import register as stage

    _run_stage(params, stage.run)


@app.command()
def rollback(
    params: ParamsOption = Path("params.yaml"),
    to: Annotated[str | None, typer.Option("--to", help="version to make champion")] = None,
) -> None:
    """Move the champion alias back to the previous champion (or to --to VERSION)."""
    from pipeline.register import rollback as move_back

    moved = _run_stage(params, lambda cfg, paths: move_back(cfg.mlflow, paths.root, to))
    typer.echo(f"champion: version {moved[0]} -> version {moved[1]}")


@app.command("dvc-remote")
def dvc_remote(
    params: ParamsOption = Path("params.yaml"),
    local: Annotated[
        bool, typer.Option("--local", help="write to .dvc/config.local (git-ignored) instead of .dvc/config")
    ] = False,
) -> None:
    """Make the S3 remote (storage.dvc_remote or PIPELINE_DVC_REMOTE_URL) DVC's default remote."""
    from pipeline.remote import configure_remote

    url = _run_stage(params, lambda cfg, paths: configure_remote(cfg.storage, paths.root, local))
    typer.echo(f"DVC remote: {url}; `dvc push` uploads data and models, `dvc pull` restores them")

"""`python -m pipeline <stage>`: one command per stage of the registry (pipeline/stages.py), plus helpers.

Every stage command is the same thin shell over the stage's `run(cfg, paths)`:
parse params.yaml, resolve the paths, run, and turn a pipeline error into one
line and a non-zero exit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.config import PipelineConfig, load_config
from pipeline.errors import PipelineError
from pipeline.logs import configure_logging
from pipeline.paths import StagePaths
from pipeline.stages import STAGES, Stage, StageFunction, stage

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run one pipeline stage, as dvc.yaml and the Prefect flow do.",
)

ParamsOption = Annotated[Path, typer.Option("--params", help="params file; its folder is the project root")]
WorkersOption = Annotated[
    int, typer.Option("--workers", help="start N local workers (MultiWorkerMirroredStrategy)")
]


def run_stage(params: Path, function: StageFunction) -> Any:
    """Load the config and paths for `params`, run `function(cfg, paths)`; errors become one line."""
    configure_logging()
    try:
        cfg = load_config(params)
        return function(cfg, StagePaths.from_config(cfg.paths, params.resolve().parent))
    except PipelineError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(error.exit_code) from None


def stage_command(registered: Stage) -> Any:
    """The CLI command of one registered stage."""

    def command(params: ParamsOption = Path("params.yaml")) -> None:
        run_stage(params, registered.entry())

    command.__doc__ = registered.summary
    return command


def train_command(params: ParamsOption = Path("params.yaml"), workers: WorkersOption = 0) -> None:
    """Train the configured model; starts the pipeline's MLflow run (--workers N: local multi-worker)."""
    if not workers:
        run_stage(params, stage("train").entry())
        return
    from pipeline.train.launch import launch

    def run_workers(cfg: PipelineConfig, paths: StagePaths) -> dict[str, str]:
        return launch(params, workers, cfg.train.distribution)

    run_stage(params, run_workers)


for _stage in STAGES:
    app.command(_stage.name)(train_command if _stage.name == "train" else stage_command(_stage))


@app.command()
def rollback(
    params: ParamsOption = Path("params.yaml"),
    to: Annotated[str | None, typer.Option("--to", help="version to make champion")] = None,
) -> None:
    """Move the champion alias back to the previous champion (or to --to VERSION)."""
    from pipeline import registry

    moved = run_stage(params, lambda cfg, paths: registry.rollback(cfg.mlflow, paths.root, to))
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

    url = run_stage(params, lambda cfg, paths: configure_remote(cfg.storage, paths.root, local))
    typer.echo(f"DVC remote: {url}; `dvc push` uploads data and models, `dvc pull` restores them")


@app.command()
def tune(params: ParamsOption = Path("params.yaml")) -> None:
    """Search the train recipe (params.yaml `tune:`) with Optuna; best params go to reports/tune.patch."""
    from pipeline import tune as tuning

    result = run_stage(params, lambda cfg, paths: tuning.run(cfg, paths, params))
    counts = ", ".join(f"{count} {state}" for state, count in result.counts.items() if count)
    typer.echo(f"study {result.study_name} ({result.storage}): {counts or 'no trials'}")
    if result.best_trial is None:
        typer.echo("no trial completed yet")
        return
    typer.echo(f"best: trial {result.best_trial}, val_accuracy {result.best_value:.4f}")
    for key, value in result.best_params.items():
        typer.echo(f"  {key}: {value:.4g}")
    if result.patch:
        typer.echo(f"params.yaml is unchanged; review the change in {result.patch}")
    else:
        typer.echo("params.yaml already holds the best params")

"""What a tuning run leaves: reports/tune.json, the params patch, the plots, and the parent MLflow run."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import mlflow
import optuna
from optuna.trial import TrialState

from pipeline.artifacts import write_report
from pipeline.config import TuneConfig
from pipeline.params_patch import params_patch
from pipeline.paths import StagePaths
from pipeline.tune.study import trial_counts

log = logging.getLogger(__name__)

PLOTS = ("optimization_history", "param_importances")


@dataclass(frozen=True)
class TuneResult:
    """What the study holds after this process: counts, the best trial, where the reports are."""

    study_name: str
    storage: str  # password masked
    target_trials: int
    counts: dict[str, int]
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any]
    mlflow_experiment_id: str
    mlflow_parent_run_id: str
    worker: str
    patch: str | None = None  # relative to the project root; None when params already hold the best
    params_not_patched: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(study: optuna.Study, cfg: TuneConfig, url: str, run: Any, worker: str) -> TuneResult:
    """The study's trial counts and best trial (None while no trial completed)."""
    surplus = sum(1 for trial in study.get_trials(deepcopy=False) if trial.user_attrs.get("surplus"))
    by_state = trial_counts(study)
    counts = {
        "complete": by_state["complete"],
        "pruned": by_state["pruned"],
        "failed": by_state["fail"] - surplus,
        "surplus": surplus,  # stepped aside untrained: the total was reached meanwhile
        "running": by_state["running"],
        "waiting": by_state["waiting"],
    }
    best = study.best_trial if counts["complete"] else None
    return TuneResult(
        study_name=study.study_name,
        storage=url,
        target_trials=cfg.trials,
        counts=counts,
        best_trial=best.number if best else None,
        best_value=best.value if best else None,
        best_params=dict(best.params) if best else {},
        mlflow_experiment_id=run.info.experiment_id,
        mlflow_parent_run_id=run.info.run_id,
        worker=worker,
    )


def write_outputs(
    study: optuna.Study, result: TuneResult, paths: StagePaths, params_file: Path
) -> TuneResult:
    """reports/tune.patch (the best params against params_file), the plots, then reports/tune.json."""
    patch, missing = None, []
    paths.tune_patch.unlink(missing_ok=True)  # never leave an older study's patch beside this report
    if result.best_params:
        name = params_file.resolve().relative_to(paths.root).as_posix()
        made = params_patch(params_file.read_text(encoding="utf-8"), result.best_params, name)
        missing = list(made.missing)
        if made.diff:
            paths.tune_patch.parent.mkdir(parents=True, exist_ok=True)
            paths.tune_patch.write_text(made.diff, encoding="utf-8")
            patch = paths.relative(paths.tune_patch)
        if missing:
            log.warning("%s has no line for %s; set them by hand", name, ", ".join(missing))
    result = replace(result, patch=patch, params_not_patched=missing)
    write_plots(study, paths)
    write_report(result.to_dict(), paths.tune_report)
    return result


def write_plots(study: optuna.Study, paths: StagePaths) -> list[Path]:
    """The optimization history and (from two completed trials on) the parameter importances, as HTML."""
    from optuna import visualization

    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    plots: dict[str, Callable[[optuna.Study], Any]] = {
        "optimization_history": visualization.plot_optimization_history
    }
    if complete >= 2:
        plots["param_importances"] = visualization.plot_param_importances
    else:
        log.info("no parameter importances: they need 2 completed trials, the study has %d", complete)
        paths.tune_plot("param_importances").unlink(missing_ok=True)
    written = []
    for name, plot in plots.items():
        target = paths.tune_plot(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        plot(study).write_html(target, include_plotlyjs=True)  # self-contained: opens offline
        written.append(target)
    return written


def log_outputs(study: optuna.Study, result: TuneResult, paths: StagePaths) -> None:
    """The parent run: best params (as `best.<key>`), best_val_accuracy, the reports and plots."""
    mlflow.set_tags({f"optuna.{state}": count for state, count in result.counts.items()})
    if result.best_trial is not None:
        best = study.trials[result.best_trial]
        mlflow.log_params({f"best.{key}": value for key, value in result.best_params.items()})
        mlflow.log_metric("best_val_accuracy", float(result.best_value or 0.0))
        mlflow.set_tags(
            {
                "optuna.best_trial": result.best_trial,
                "optuna.best_run": best.user_attrs.get("mlflow_run_id", ""),
            }
        )
        found = ", ".join(f"{key}={value:.4g}" for key, value in result.best_params.items())
        log.info("best trial %d: val_accuracy %.4f with %s", result.best_trial, result.best_value, found)
        if result.patch:
            log.info("params.yaml is unchanged; to use them: git apply %s && dvc repro", result.patch)
    for file in (paths.tune_report, paths.tune_patch, *map(paths.tune_plot, PLOTS)):
        if file.is_file():
            mlflow.log_artifact(str(file), "tuning")

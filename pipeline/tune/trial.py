"""One trial: the searched values, the train section they make, and its training in a nested MLflow run."""

from __future__ import annotations

import logging
import math
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import mlflow
import optuna
from optuna_integration import KerasPruningCallback
from pydantic import BaseModel

from pipeline.config import PipelineConfig, TrainConfig, TuneSpace
from pipeline.paths import StagePaths
from pipeline.train import fit_candidate
from pipeline.tune.study import is_surplus

log = logging.getLogger(__name__)

LOG_SCALE = {"learning_rate", "fine_tune_learning_rate", "weight_decay"}
# Each knob of tune.space and the params.yaml key it sets (also the Optuna and the MLflow param name).
KNOBS = {
    "learning_rate": "train.learning_rate",
    "fine_tune_learning_rate": "train.fine_tune.learning_rate",
    "batch_size": "train.batch_size",
    "weight_decay": "train.weight_decay",
    "dropout": "train.dropout",
    "width": "train.width",
    "zoom": "train.augment.zoom",
    "translation": "train.augment.translation",
    "rotation": "train.augment.rotation",
    "contrast": "train.augment.contrast",
}
TRANSFER_ONLY = {"fine_tune_learning_rate"}
SMALL_CNN_ONLY = {"width"}


def suggest(trial: optuna.Trial, space: TuneSpace, model: str) -> dict[str, Any]:
    """The trial's values of the knobs searched for `model`, by params.yaml key."""
    skip = TRANSFER_ONLY if model == "small_cnn" else SMALL_CNN_ONLY
    chosen: dict[str, Any] = {}
    for knob, key in KNOBS.items():
        choices = getattr(space, knob)
        if choices is None or knob in skip:
            continue
        if isinstance(choices, list):
            chosen[key] = trial.suggest_categorical(key, choices)
        else:
            chosen[key] = trial.suggest_float(key, choices[0], choices[1], log=knob in LOG_SCALE)
    return chosen


def updated(section: BaseModel, values: Mapping[str, Any]) -> Any:
    """A copy of a config section with values by dotted key (relative to it); nested sections are copied."""
    nested: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    children = {head: updated(getattr(section, head), inner) for head, inner in nested.items()}
    return section.model_copy(update={**top, **children})


def trial_config(train: TrainConfig, chosen: Mapping[str, Any], max_steps: int) -> TrainConfig:
    """The train section of one trial: the chosen values, its steps capped at `max_steps`.

    Raises:
        pydantic.ValidationError: when a combination is not a valid train section
            (model_copy does not validate, so the copy is validated here).
    """
    values = {key.removeprefix("train."): value for key, value in chosen.items()}
    batch = values.get("batch_size", train.batch_size)
    values |= {
        "min_batch_size": min(train.min_batch_size, batch),
        "max_steps": min(train.max_steps, max_steps),
        "min_steps": min(train.min_steps, max_steps),
    }
    return TrainConfig.model_validate(updated(train, values).model_dump())


def mark_killed(run_id: str | None) -> None:
    """A retried trial's MLflow run, left RUNNING by its dead process, is marked KILLED."""
    if not run_id:
        return
    client = mlflow.MlflowClient()
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
    except mlflow.exceptions.MlflowException:  # the run is in another machine's tracking store
        log.debug("MLflow run %s of the retried trial is not in this store", run_id)


class PruningCallback(KerasPruningCallback):  # type: ignore[misc]
    """Optuna's Keras pruning callback (it works with Keras 3) on val_accuracy, keeping the best value."""

    def __init__(self, trial: optuna.Trial) -> None:
        super().__init__(trial, "val_accuracy")
        self.best: float | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        if logs and "val_accuracy" in logs:
            self.best = max(self.best or 0.0, float(logs["val_accuracy"]))
        super().on_epoch_end(epoch, logs)


class Objective:
    """One trial: suggest, train with fit_candidate in a nested MLflow run, return the best val_accuracy."""

    def __init__(self, cfg: PipelineConfig, paths: StagePaths, experiment_id: str, worker: str) -> None:
        self.cfg, self.paths, self.experiment_id, self.worker = cfg, paths, experiment_id, worker

    def __call__(self, trial: optuna.Trial) -> float:
        tune = self.cfg.tune
        if is_surplus(trial, tune.trials):
            log.info(
                "trial %d is not needed: the study's %d trials are finished or running",
                trial.number,
                tune.trials,
            )
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            return math.nan  # Optuna records a trial that returns NaN as failed
        chosen = suggest(trial, tune.space, self.cfg.train.model)
        train = trial_config(self.cfg.train, chosen, tune.trial_max_steps)
        # A retry inherits the dead trial's user attributes: its MLflow run, its number, its workdir.
        mark_killed(trial.user_attrs.get("mlflow_run_id"))
        origin = trial.user_attrs.get("origin", trial.number)
        workdir_key = trial.user_attrs.get("workdir", uuid.uuid4().hex)
        workdir = self.paths.resolve(tune.cache) / "trials" / workdir_key  # a retry here resumes its epochs
        run_name = f"trial-{trial.number}"
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name, nested=True) as run:
            attrs = {
                "worker": self.worker,
                "origin": origin,
                "workdir": workdir_key,
                "mlflow_run_id": run.info.run_id,
            }
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            tags = {
                "optuna.study": tune.study_name,
                "optuna.trial": trial.number,
                "optuna.worker": self.worker,
            }
            if origin != trial.number:
                tags["optuna.retry_of"] = origin
            mlflow.set_tags(tags)
            mlflow.log_params(chosen)
            try:
                return self._fit(trial, train, workdir)
            except optuna.TrialPruned as error:
                pruned = error  # raised after the run ends: a pruned trial's run is FINISHED, not FAILED
        raise pruned

    def _fit(self, trial: optuna.Trial, train: TrainConfig, workdir: Path) -> float:
        """Train inside the trial's MLflow run; tag the run with the trial's state, however it ends."""
        pruning = PruningCallback(trial)
        try:
            candidate = fit_candidate(train, self.paths, workdir, [pruning])
        except optuna.TrialPruned:
            mlflow.set_tag("optuna.state", "PRUNED")
            if pruning.best is not None:
                mlflow.log_metric("best_val_accuracy", pruning.best)
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        except Exception:
            mlflow.set_tag("optuna.state", "FAIL")
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        finally:
            keras.backend.clear_session()
        shutil.rmtree(workdir, ignore_errors=True)
        mlflow.log_params(candidate.recipe.flat())
        mlflow.log_metric("best_val_accuracy", candidate.best_val_accuracy)
        mlflow.set_tag("optuna.state", "COMPLETE")
        return candidate.best_val_accuracy

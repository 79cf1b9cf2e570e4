"""tune: an Optuna study over the train recipe; trials are nested MLflow runs, the best params a patch.

`run(cfg, paths)` searches the knobs of `tune.space` (learning rates, batch
size, weight decay, dropout, width, augmentation strengths), training each
trial with `pipeline.train.fit_candidate` on the train split and scoring it by
its best validation accuracy; the test split is never looked at. Trials that
lag behind at the same epoch are pruned (`tune.pruner`).

The study lives in an RDB storage (a SQLite file in the project by default, or
`tune.storage` / PIPELINE_TUNE_STORAGE: a database several machines share).
Every process works until the study has `tune.trials` finished trials between
them all, so a killed run, started again, continues the same study. A running
trial keeps a heartbeat in the storage; one whose process died is failed after
`tune.grace_seconds` and retried (up to `tune.max_retry` times), from its last
finished epoch when the retry runs on the same machine.

The best params become `reports/tune.patch`; params.yaml is never changed.

- `study`: the storage, the study, when a process stops, trials in excess of the total
- `trial`: the searched values, the trial's train section, its training and nested run
- `report`: reports/tune.json, the patch, the plots, the parent run's record
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import optuna
import tensorflow as tf

from pipeline import tracking
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.paths import StagePaths
from pipeline.tune.report import TuneResult, log_outputs, summarize, write_outputs
from pipeline.tune.study import (
    masked,
    open_storage,
    open_study,
    stop_when_done,
    study_is_done,
    trial_counts,
    worker_name,
)
from pipeline.tune.trial import Objective

__all__ = ["TuneResult", "require_inputs", "run"]

log = logging.getLogger(__name__)


def require_inputs(paths: StagePaths) -> None:
    """Fail before any trial when the splits or the manifest are missing.

    Raises:
        PipelineError: naming the missing file and the command that makes it.
    """
    for file in (*(paths.split_file(name) for name in ("train", "val", "test")), paths.manifest):
        if not file.is_file():
            raise PipelineError(
                f"{paths.relative(file)} not found; tuning trains on the splits: run `dvc repro split` "
                "(or `python -m pipeline split`) first"
            )


def run(cfg: PipelineConfig, paths: StagePaths, params_file: Path | None = None) -> TuneResult:
    """Join (or create) the study, run trials until it has `tune.trials`, write the reports.

    Args:
        cfg: the whole config; `tune` drives the study, `train` is the recipe each trial varies.
        paths: resolved stage paths (the splits must exist).
        params_file: the params file the patch is made against (default: params.yaml in the root).

    Returns:
        The study's counts and best trial after this process.

    Raises:
        PipelineError: when the splits are missing, or the storage or tracking store is unusable.
    """
    require_inputs(paths)
    optuna.logging.disable_default_handler()  # Optuna's records in the pipeline's log format
    optuna.logging.enable_propagation()
    worker = worker_name()
    storage = open_storage(cfg.tune, paths)
    study = open_study(cfg.tune, storage, worker)
    url = masked(storage.url)
    experiment_id = tracking.configure(cfg.mlflow, paths.root)
    counts = trial_counts(study)
    finished = counts["complete"] + counts["pruned"]
    log.info("study %s in %s: %d of %d trials finished; this process is %s",
             cfg.tune.study_name, url, finished, cfg.tune.trials, worker)  # fmt: skip
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"tune-{cfg.tune.study_name}") as parent:
        mlflow.set_tags(
            {
                "optuna.study": cfg.tune.study_name,
                "optuna.storage": url,
                "optuna.worker": worker,
                "mlflow.source.git.commit": tracking.git_commit(paths.root),
            }
        )
        recipe = {k: v for k, v in tracking.flat_params(cfg).items() if k.startswith(("train.", "tune."))}
        mlflow.log_params({**recipe, "tune.storage": url})
        if not study_is_done(study, cfg.tune):
            study.optimize(
                Objective(cfg, paths, experiment_id, worker),
                timeout=cfg.tune.timeout_seconds,
                callbacks=[stop_when_done(cfg.tune)],
                catch=(tf.errors.ResourceExhaustedError,),  # a trial too large for the device; go on
                gc_after_trial=True,
            )
        result = summarize(study, cfg.tune, url, parent, worker)
        result = write_outputs(study, result, paths, params_file or paths.root / "params.yaml")
        log_outputs(study, result, paths)
    return result

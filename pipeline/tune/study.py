"""The study and its storage: joined by any number of processes, finished at exactly `tune.trials` trials."""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
import zlib
from collections.abc import Callable

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from pipeline.config import TuneConfig
from pipeline.errors import PipelineError
from pipeline.paths import StagePaths

log = logging.getLogger(__name__)

# The heartbeat and retry API is marked experimental; the warning says nothing a user can act on.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def worker_name() -> str:
    """This process, as trials and runs record it: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def masked(url: str) -> str:
    """A storage URL fit to print: any password replaced by ***."""
    return make_url(url).render_as_string(hide_password=True)


def storage_url(cfg: TuneConfig, paths: StagePaths) -> str:
    """tune.storage, or the project's SQLite study file (its folder created)."""
    if cfg.storage:
        return cfg.storage
    database = paths.resolve(cfg.cache) / "optuna.db"
    database.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{database}"


def open_storage(cfg: TuneConfig, paths: StagePaths) -> optuna.storages.RDBStorage:
    """The RDB storage with heartbeats: a dead process's running trials are failed and retried.

    Raises:
        PipelineError: naming the (masked) URL when the database cannot be used.
    """
    url = storage_url(cfg, paths)
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(
        max_retry=cfg.max_retry, inherit_intermediate_values=True
    )
    attempts = 3  # processes starting together on an empty database race to create its tables
    for attempt in range(1, attempts + 1):
        try:
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=cfg.heartbeat_seconds,
                grace_period=cfg.grace_seconds,
                heartbeat_stale_trial_callback=retry,
            )
        except sqlalchemy.exc.SQLAlchemyError as error:
            if attempt == attempts:
                raise PipelineError(
                    f"tuning storage {masked(url)} is not usable: {error.__class__.__name__}: "
                    f"{str(error).splitlines()[0]}. Check tune.storage or PIPELINE_TUNE_STORAGE"
                ) from None
            time.sleep(attempt)
    raise AssertionError("unreachable")


def make_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    """tune.pruner: median, hyperband (over epochs) or none."""
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=cfg.pruner_warmup_epochs
        )
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    return optuna.pruners.NopPruner()


def open_study(cfg: TuneConfig, storage: optuna.storages.RDBStorage, worker: str) -> optuna.Study:
    """Create the study, or join it when another process (or an earlier run) created it.

    The sampler's seed mixes tune.seed with this process and the trials so far, so parallel
    and resumed processes do not repeat each other's first draws.
    """
    study = optuna.create_study(
        storage=storage,
        study_name=cfg.study_name,
        direction="maximize",
        pruner=make_pruner(cfg),
        load_if_exists=True,
    )
    seed = zlib.crc32(f"{cfg.seed}:{len(study.trials)}:{worker}".encode())
    study.sampler = optuna.samplers.TPESampler(seed=seed)
    return study


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Trials by state, lower-case names (complete, pruned, fail, running, waiting)."""
    counts = {state.name.lower(): 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] += 1
    return counts


def study_is_done(study: optuna.Study, cfg: TuneConfig) -> bool:
    """Whether this process should stop: the study has its trials, or running ones will bring it there.

    When the running trials would finish the study, wait for them, at most the grace
    period and a heartbeat: a live process finishes its trial; a dead one's trial is
    failed and a retry queued, which this process then runs.
    """
    deadline = time.monotonic() + cfg.grace_seconds + cfg.heartbeat_seconds
    while True:
        counts = trial_counts(study)
        finished = counts["complete"] + counts["pruned"]
        if finished >= cfg.trials:
            return True
        if counts["waiting"] or finished + counts["running"] < cfg.trials:
            return False
        if time.monotonic() > deadline:
            log.info("stopping: %d running trial(s) of other processes finish the study", counts["running"])
            return True
        time.sleep(min(cfg.heartbeat_seconds, 5))
        optuna.storages.fail_stale_trials(study)


def stop_when_done(cfg: TuneConfig) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """An optimize callback: stop this process once `study_is_done`."""

    def callback(study: optuna.Study, _: optuna.trial.FrozenTrial) -> None:
        if study_is_done(study, cfg):
            study.stop()

    return callback


def is_surplus(trial: optuna.Trial, total: int) -> bool:
    """Whether the study's total is already finished, or claimed by trials started before this one.

    Two processes can start a trial at the same moment; trial numbers order them, so the later
    one steps aside and the study ends with exactly `total` finished trials.
    """
    claimed = 0
    for other in trial.study.get_trials(deepcopy=False):
        earlier = other.number < trial.number and other.state in (TrialState.RUNNING, TrialState.WAITING)
        claimed += other.state in FINISHED or earlier
    return claimed >= total

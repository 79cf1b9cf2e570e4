"""An interrupted training continues where it stopped: same MLflow run, no epoch trained twice.

The interruption is a callback that raises at the end of the second epoch
(0-based epoch 1). Extra callbacks run after the pipeline's own, so by then
BackupAndRestore has saved that epoch and the CSVLogger has written its row:
two epochs are complete, and the second run must train only the rest.
"""

from __future__ import annotations

import json

import keras
import mlflow
import pandas as pd
import pytest

from pipeline import train
from pipeline.tracking import read_run_id
from tests.model.conftest import local_tracking

pytestmark = pytest.mark.slow

EPOCHS = 4
INTERRUPT_AFTER = 2  # epochs completed before the interruption


class Interrupt(keras.callbacks.Callback):
    """Fails the run at the end of epoch `after` (1-based), as a killed job would."""

    def __init__(self, after: int = INTERRUPT_AFTER) -> None:
        super().__init__()
        self.after = after

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch == self.after - 1:
            raise RuntimeError("interrupted by the test")


class EpochCounter(keras.callbacks.Callback):
    """Records the (0-based) epochs that were actually trained."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[int] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started.append(epoch)


@pytest.fixture
def interrupted(project_copy):
    """A project whose training of EPOCHS epochs was interrupted after INTERRUPT_AFTER."""
    project = project_copy({"train": {"epochs": EPOCHS}})
    with local_tracking(), pytest.raises(RuntimeError, match="interrupted by the test"):
        train.run(project.cfg, project.paths, callbacks=[Interrupt()])
    return project


def test_interrupted_training_resumes_in_the_same_run(interrupted) -> None:
    cfg, paths = interrupted.cfg, interrupted.paths
    backup = paths.train_backup / train.run_fingerprint(cfg.train, paths)
    assert backup.is_dir()
    run_id = (backup / "mlflow_run_id").read_text().strip()
    assert json.loads((backup / "train" / "training_metadata.json").read_text())["epoch"] == INTERRUPT_AFTER
    assert len(pd.read_csv(backup / "train_history.csv")) == INTERRUPT_AFTER
    assert not paths.keras_model.exists(), "an interrupted run must not publish a model"
    client = mlflow.MlflowClient(f"sqlite:///{paths.root / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FAILED"

    counter = EpochCounter()
    with local_tracking():
        result = train.run(cfg, paths, callbacks=[counter])

    assert result.resumed
    assert result.run_id == run_id
    assert read_run_id(paths) == run_id
    assert counter.started == list(range(INTERRUPT_AFTER, EPOCHS))
    assert result.epochs == EPOCHS
    history = pd.read_csv(paths.train_history)
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert set(history["phase"]) == {"train"}
    assert paths.keras_model.is_file()
    assert not backup.exists(), "the finished job's backup should be removed"

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "accuracy")]
    assert sorted(steps) == list(range(EPOCHS))
    assert run.data.params["train.epochs"] == str(EPOCHS)  # logged once, by the first run
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_changed_job_does_not_pick_up_another_jobs_backup(interrupted, project_copy) -> None:
    cfg, paths = interrupted.cfg, interrupted.paths
    backup = paths.train_backup / train.run_fingerprint(cfg.train, paths)
    other = project_copy({"train": {"epochs": EPOCHS, "seed": 7}})
    assert other.paths.root == paths.root

    counter = EpochCounter()
    with local_tracking():
        result = train.run(other.cfg, other.paths, callbacks=[counter])

    assert not result.resumed
    assert result.run_id != (backup / "mlflow_run_id").read_text().strip()
    assert counter.started == list(range(EPOCHS))
    assert backup.is_dir(), "the interrupted job's backup is kept for its own resume"


def test_transfer_job_interrupted_in_the_head_phase_fine_tunes_from_the_right_epoch(project_copy) -> None:
    """Head: 2 epochs, interrupted after the first; fine-tuning: 1 epoch (0-based epoch 2)."""
    project = project_copy(
        {"train": {"model": "mobilenet_v2", "epochs": 2, "fine_tune": {"epochs": 1, "layers": 2}}}
    )
    with local_tracking(), pytest.raises(RuntimeError, match="interrupted by the test"):
        train.run(project.cfg, project.paths, callbacks=[Interrupt(after=1)])

    counter = EpochCounter()
    with local_tracking():
        result = train.run(project.cfg, project.paths, callbacks=[counter])

    assert result.resumed
    history = pd.read_csv(project.paths.train_history)
    assert history[["epoch", "phase"]].values.tolist() == [[1, "head"], [2, "head"], [3, "fine_tune"]]
    assert counter.started == [1, 2]

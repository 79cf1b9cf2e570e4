"""Training callbacks: early stopping (in steps), checkpoints, TensorBoard, resume, MLflow metrics.

The learning-rate schedule is the optimizer's (warmup + cosine, pipeline/train/phases.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import mlflow

from pipeline.train.recipe import Phase

log = logging.getLogger(__name__)


def history_file(backup_dir: Path, phase: str) -> Path:
    """The CSVLogger file of one phase; it survives a resume, so history spans interruptions."""
    return backup_dir / f"{phase}_history.csv"


class MlflowEpochMetrics(keras.callbacks.Callback):
    """Log every epoch's metrics to the active MLflow run, numbered across both phases."""

    def __init__(self, phase: str) -> None:
        super().__init__()
        self.phase = phase

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = {key: float(value) for key, value in (logs or {}).items()}
        metrics["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        mlflow.log_metrics(metrics, step=epoch)


def _readable(weights: Path) -> bool:
    import h5py

    try:
        with h5py.File(weights, "r"):
            return True
    except OSError:
        return False


def drop_torn_backup(folder: Path) -> None:
    """A resume state whose weights a kill tore mid-write, with no readable previous copy, is dropped.

    BackupAndRestore (with double_checkpoint) falls back to the previous copy
    itself; only when there is none does the phase start over instead of
    failing on the torn HDF5 file.
    """
    weights = folder / "latest.weights.h5"
    previous = folder / "latest.weights.h5.bkp"
    if not weights.is_file() or _readable(weights) or (previous.is_file() and _readable(previous)):
        return
    log.warning("the resume state in %s was torn by an interrupted write; this phase starts over", folder)
    for name in (
        "latest.weights.h5",
        "latest.weights.h5.bkp",
        "training_metadata.json",
        "training_metadata.json.bkp",
    ):
        (folder / name).unlink(missing_ok=True)


def training_callbacks(
    budget: Phase,
    phase: str,
    backup_dir: Path,
    checkpoint: Path,
    tensorboard_dir: Path | None,
    chief: bool = True,
    first_epoch: int = 0,
) -> list[keras.callbacks.Callback]:
    """The callbacks of one training phase.

    Args:
        budget: the phase's steps (pipeline/train/recipe.py): patience and the earliest stop.
        phase: `head` or `fine_tune` (or `train` for models without a base).
        backup_dir: BackupAndRestore state; a killed run resumes from here.
        checkpoint: best model so far (by validation loss).
        tensorboard_dir: TensorBoard log folder (None: no TensorBoard logs).
        chief: whether this process writes MLflow metrics (only the chief of a multi-worker job).
        first_epoch: the epoch number the phase starts at (fine-tuning continues the head's count).
    """
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    drop_torn_backup(backup_dir / phase)
    # History and metrics are written before BackupAndRestore marks the epoch done, so a kill
    # between the two repeats the epoch (dropped as a duplicate) instead of losing its row.
    return [
        keras.callbacks.CSVLogger(str(history_file(backup_dir, phase)), append=True),
        *([MlflowEpochMetrics(phase)] if chief else []),
        keras.callbacks.BackupAndRestore(str(backup_dir / phase), double_checkpoint=True),
        keras.callbacks.EarlyStopping(
            monitor="val_loss",
            patience=budget.patience_epochs,
            start_from_epoch=first_epoch + budget.start_from_epoch,  # never before min_steps
            restore_best_weights=True,
        ),
        keras.callbacks.ModelCheckpoint(str(checkpoint), monitor="val_loss", save_best_only=True),
        *([keras.callbacks.TensorBoard(log_dir=str(tensorboard_dir / phase))] if tensorboard_dir else []),
    ]

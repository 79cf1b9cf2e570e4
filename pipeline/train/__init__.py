"""train: fit the configured Keras model on the train split, validate on val, start the MLflow run."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import tensorflow as tf

from pipeline import tracking
from pipeline.artifacts import class_names_of, read_split, write_class_names
from pipeline.config import PipelineConfig, TrainConfig
from pipeline.paths import StagePaths
from pipeline.train import distribute
from pipeline.train.augment import augmentation
from pipeline.train.data import image_dataset
from pipeline.train.mlflow_run import log_run_context, start_or_resume_run
from pipeline.train.models import build_model, float32_copy, weights_digest
from pipeline.train.phases import class_weights, fit_phases, history_frame

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """The trained model and where its run is."""

    model_path: Path
    run_id: str
    epochs: int
    best_val_accuracy: float
    resumed: bool


def run_fingerprint(cfg: TrainConfig, paths: StagePaths) -> str:
    """Identifies one training job (config and data), so a resume never picks up another job's state."""
    digest = hashlib.sha256(cfg.model_dump_json().encode())
    for name in ("train", "val"):
        digest.update(paths.split_file(name).read_bytes())
    return digest.hexdigest()[:16]


def run(
    cfg: PipelineConfig, paths: StagePaths, *, callbacks: Sequence[keras.callbacks.Callback] = ()
) -> TrainResult:
    """Train the model in params and save it to models/keras/model.keras.

    Args:
        cfg: the whole config (all of it is logged to MLflow).
        paths: resolved stage paths.
        callbacks: extra Keras callbacks (tests use one to interrupt a run).

    Returns:
        Where the model is and the MLflow run id.
    """
    dist = distribute.setup(cfg.train)  # first: a multi-worker strategy must precede other TF work
    keras.utils.set_random_seed(cfg.train.seed)
    with op_determinism():  # same data and params, same weights (per device type)
        return _train(cfg, paths, dist, callbacks)


@contextlib.contextmanager
def op_determinism() -> Iterator[None]:
    """Deterministic TensorFlow ops for the block only.

    The setting is process-wide; left on, it makes tf.data rewrite Keras' later
    `predict` pipelines (in a flow run: MLflow's check of the logged model in
    register) and TensorFlow logs an `E0000 ... use_unbounded_threadpool` line
    for each. TensorFlow has no public switch back, so this uses the one its
    config module defines.
    """
    from tensorflow.python.framework import config as tf_config

    was_on = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if not was_on:
            tf_config.disable_op_determinism()


def _train(
    cfg: PipelineConfig,
    paths: StagePaths,
    dist: distribute.Distribution,
    callbacks: Sequence[keras.callbacks.Callback],
) -> TrainResult:
    splits = {name: read_split(paths, name) for name in ("train", "val", "test")}
    names = class_names_of(splits["train"])
    size, batch = cfg.train.image_size, dist.global_batch_size
    options = distribute.distribute_options()
    train_ds = image_dataset(
        splits["train"],
        paths.root,
        names,
        size,
        batch,
        shuffle_seed=cfg.train.seed,
        augment=augmentation(cfg.train.augment),
    ).with_options(options)
    val_ds = image_dataset(splits["val"], paths.root, names, size, batch).with_options(options)
    with dist.strategy.scope():
        built = build_model(cfg.train, len(names), paths.root, dist.replicas)
    backup = paths.train_backup / run_fingerprint(cfg.train, paths)
    if not dist.chief:  # per-worker resume state, on the same (shared) storage
        backup = backup / "workers" / dist.worker
    backup.mkdir(parents=True, exist_ok=True)
    active, resumed = (
        start_or_resume_run(cfg, paths, backup) if dist.chief else (contextlib.nullcontext(), False)
    )
    with active as run_, dist.strategy.scope():
        if dist.chief and not resumed:
            log_run_context(cfg, paths, splits, built, dist)
        fit_phases(
            built,
            train_ds,
            val_ds,
            cfg.train,
            backup,
            paths,
            class_weights(splits["train"], names, cfg.train),
            dist,
            callbacks,
        )
        digest = weights_digest(built.model)
        log.info("final weights sha256 %s (%s)", digest, dist.worker)
        model = built.model
        if dist.precision != "float32":
            model = float32_copy(model, cfg.train, len(names), paths.root)
        # Every worker saves: with a multi-worker strategy saving is a collective operation.
        model.save(paths.keras_model if dist.chief else backup / "model.keras")
        if not dist.chief:
            shutil.rmtree(backup, ignore_errors=True)
            return TrainResult(paths.keras_model, "", 0, float("nan"), resumed)
        write_class_names(names, paths.classes)
        history = history_frame(backup)
        history_path = paths.train_history
        history_path.parent.mkdir(parents=True, exist_ok=True)
        history.to_csv(history_path, index=False, lineterminator="\n")
        mlflow.log_artifact(str(history_path), "reports")
        tracking.write_run_file(paths, run_)
    shutil.rmtree(backup, ignore_errors=True)
    best = float(history["val_accuracy"].max()) if "val_accuracy" in history else float("nan")
    log.info(
        "trained %s for %d epochs (best val accuracy %.4f) -> %s",
        cfg.train.model,
        len(history),
        best,
        paths.relative(paths.keras_model),
    )
    assert run_ is not None  # the chief always has its MLflow run
    return TrainResult(paths.keras_model, run_.info.run_id, len(history), best, resumed)

"""train: fit the configured Keras model on the train split, validate on val, start the MLflow run."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from pipeline import tracking
from pipeline.config import PipelineConfig, StagePaths, TrainConfig
from pipeline.train import distribute
from pipeline.train.augment import augmentation
from pipeline.train.callbacks import training_callbacks
from pipeline.train.data import class_names_of, image_dataset, read_split, write_class_names
from pipeline.train.distribute import Distribution
from pipeline.train.loop import fit_multi_worker
from pipeline.train.models import BuiltModel, build_model, unfreeze_top

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """The trained model and where its run is."""

    model_path: Path
    run_id: str
    epochs: int
    best_val_accuracy: float
    resumed: bool


def class_weights(train: pd.DataFrame, names: list[str], cfg: TrainConfig) -> dict[int, float] | None:
    """Balanced class weights when asked, or (auto) when the classes are imbalanced."""
    counts = train["label"].value_counts()
    imbalanced = counts.max() / counts.min() > cfg.imbalance_threshold
    if cfg.class_weights == "none" or (cfg.class_weights == "auto" and not imbalanced):
        return None
    labels = np.array([names.index(label) for label in train["label"]])
    weights = compute_class_weight("balanced", classes=np.arange(len(names)), y=labels)
    return {i: float(w) for i, w in enumerate(weights)}


def run_fingerprint(cfg: TrainConfig, paths: StagePaths) -> str:
    """Identifies one training job (config and data), so a resume never picks up another job's state."""
    digest = hashlib.sha256(cfg.model_dump_json().encode())
    for name in ("train", "val"):
        digest.update(paths.split_file(name).read_bytes())
    return digest.hexdigest()[:16]


def history_frame(backup: Path) -> pd.DataFrame:
    """One row per epoch across phases and resumes, from the CSVLogger files (epochs 1-based)."""
    frames = []
    for phase in ("train", "head", "fine_tune"):
        log_file = backup / f"{phase}_history.csv"
        if log_file.is_file():
            frames.append(pd.read_csv(log_file).assign(phase=phase))
    history = pd.concat(frames).drop_duplicates("epoch", keep="last")
    history["epoch"] += 1
    return history[["epoch", "phase", *[c for c in history.columns if c not in {"epoch", "phase"}]]]


def _compile(model: keras.Model, learning_rate: float, jit_compile: bool) -> None:
    # Under a mixed_float16 policy Keras wraps the optimizer in a LossScaleOptimizer itself.
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )


def weights_digest(model: keras.Model) -> str:
    """sha256 over all weights: workers of one job must end with the same."""
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()


def float32_copy(model: keras.Model, cfg: TrainConfig, num_classes: int, root: Path) -> keras.Model:
    """The same network under the float32 policy, with the trained weights.

    Mixed-precision training keeps its variables in float32, so nothing is
    lost; the saved model then evaluates, serves and converts to TFLite
    exactly like a float32-trained one.
    """
    keras.mixed_precision.set_global_policy("float32")
    twin = build_model(cfg.model_copy(update={"weights": "none"}), num_classes, root).model
    twin.set_weights(model.get_weights())
    return twin


def _fit(
    model: keras.Model,
    dist: Distribution,
    cfg: TrainConfig,
    train: tf.data.Dataset,
    val: tf.data.Dataset,
    *,
    epochs: int,
    initial_epoch: int,
    class_weight: dict[int, float] | None,
    callbacks: Sequence[keras.callbacks.Callback],
) -> None:
    """`model.fit`, or the multi-worker loop where Keras 3's fit cannot run."""
    if dist.multi_worker:
        fit_multi_worker(
            model,
            dist.strategy,
            train,
            val,
            epochs=epochs,
            initial_epoch=initial_epoch,
            class_weight=class_weight,
            callbacks=callbacks,
            jit_compile=cfg.jit_compile,
        )
        return
    model.fit(
        train,
        validation_data=val,
        initial_epoch=initial_epoch,
        epochs=epochs,
        class_weight=class_weight,
        callbacks=list(callbacks),
        verbose=2,
    )


def fit_phases(
    built: BuiltModel,
    train: tf.data.Dataset,
    val: tf.data.Dataset,
    cfg: TrainConfig,
    backup: Path,
    paths: StagePaths,
    weights: dict[int, float] | None,
    dist: Distribution,
    extra: Sequence[keras.callbacks.Callback] = (),
) -> None:
    """Train: one phase for the small CNN; head then fine-tuning for transfer models.

    A finished head phase is saved under `backup`, so a run killed during
    fine-tuning resumes there instead of redoing the head. Only the chief
    writes checkpoints and TensorBoard logs where users look; other workers
    keep theirs under `backup`.
    """
    scratch = paths.models if dist.chief else backup
    checkpoint = scratch / "keras" / "checkpoint.keras"
    tensorboard = paths.reports / "tensorboard" if dist.chief else None
    model, base = built.model, built.base
    first_phase = "train" if base is None else "head"
    head_done = backup / "head.weights.h5"
    if base is not None:
        base.trainable = False
    _compile(model, dist.learning_rate, cfg.jit_compile)
    if head_done.is_file():
        log.info("head phase already finished in an earlier run; loading %s", head_done)
        model.load_weights(head_done)
    else:
        callbacks = training_callbacks(cfg, first_phase, backup, checkpoint, tensorboard, dist.chief)
        _fit(
            model,
            dist,
            cfg,
            train,
            val,
            epochs=cfg.epochs,
            initial_epoch=0,
            class_weight=weights,
            callbacks=[*callbacks, *extra],
        )
        if base is not None:
            model.save_weights(head_done)
    if base is not None and cfg.fine_tune.epochs > 0:
        unfrozen = unfreeze_top(base, cfg.fine_tune.layers)
        log.info("fine-tuning %d base layers at learning rate %g", unfrozen, dist.fine_tune_learning_rate)
        _compile(model, dist.fine_tune_learning_rate, cfg.jit_compile)
        # BackupAndRestore leaves the head phase's restored epoch on the model, and fit() prefers it
        # over initial_epoch; clear it so fine-tuning starts where it should.
        model._initial_epoch = None
        start = cfg.epochs
        callbacks = training_callbacks(cfg, "fine_tune", backup, checkpoint, tensorboard, dist.chief)
        _fit(
            model,
            dist,
            cfg,
            train,
            val,
            epochs=start + cfg.fine_tune.epochs,
            initial_epoch=start,
            class_weight=weights,
            callbacks=[*callbacks, *extra],
        )


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
) -> None:
    """Params, provenance tags (with the strategy and dtype policy used) and the dataset inputs."""
    mlflow.log_params(tracking.flat_params(cfg))
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
    tf.config.experimental.enable_op_determinism()  # same data and params, same weights (per device type)
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
        write_class_names(names, paths.keras_model.parent / "classes.json")
        history = history_frame(backup)
        history_path = paths.report("train_history.csv")
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

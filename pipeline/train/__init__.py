"""train: fit the configured Keras model on the train split, validate on val, start the MLflow run."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import pandas as pd
import tensorflow as tf

from pipeline import tracking
from pipeline.artifacts import class_names_of, read_split, write_class_names, write_report
from pipeline.config import PipelineConfig, TrainConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.paths import StagePaths
from pipeline.teacher import Teacher, load_teacher
from pipeline.train import distribute
from pipeline.train.augment import augmentation
from pipeline.train.data import image_dataset
from pipeline.train.mlflow_run import log_run_context, start_or_resume_run
from pipeline.train.models import build_model, float32_copy, weights_digest
from pipeline.train.phases import Outputs, class_weights, fit_phases, history_frame
from pipeline.train.recipe import Recipe, plan, short_sides

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


@dataclass(frozen=True)
class Prepared:
    """The splits, class names, recipe and input pipelines of one training job."""

    splits: dict[str, pd.DataFrame]
    names: list[str]
    recipe: Recipe
    train: tf.data.Dataset
    val: tf.data.Dataset


def prepare(cfg: TrainConfig, paths: StagePaths, dist: distribute.Distribution) -> Prepared:
    """Read the splits, plan the recipe for them (pipeline/train/recipe.py), build the datasets."""
    splits = {name: read_split(paths, name) for name in ("train", "val", "test")}
    names = class_names_of(splits["train"])
    if not paths.manifest.is_file():
        raise PipelineError(f"{paths.relative(paths.manifest)} not found; run `python -m pipeline ingest`")
    sides = short_sides(splits["train"], pd.read_csv(paths.manifest, dtype={"path": str}))
    planned = plan(cfg, sides, dist.replicas, dist.learning_rate, dist.fine_tune_learning_rate)
    options = distribute.distribute_options()
    train_ds = image_dataset(
        splits["train"],
        paths.root,
        names,
        planned.image_size,
        planned.global_batch_size,
        shuffle_seed=cfg.seed,
        augment=augmentation(cfg.augment),
        repeat=True,
    ).with_options(options)
    val_ds = image_dataset(
        splits["val"], paths.root, names, planned.image_size, planned.global_batch_size
    ).with_options(options)
    log.info(
        "recipe: %dx%d input (%s), batch %d, %d steps per epoch (%.1f passes), up to %d epochs = %d steps, "
        "warmup %d steps then cosine, early stopping after %d steps",
        planned.image_size,
        planned.image_size,
        planned.image_size_rule,
        planned.global_batch_size,
        planned.steps_per_epoch,
        planned.passes_per_epoch,
        planned.first.epochs,
        planned.first.steps,
        planned.first.warmup_steps,
        planned.first.start_from_epoch * planned.steps_per_epoch,
    )
    return Prepared(splits, names, planned, train_ds, val_ds)


def learning_report(history: pd.DataFrame, val: pd.DataFrame, recipe: Recipe) -> dict:
    """Whether the model learned: best validation accuracy against chance, with what to try if not.

    Chance is the share of the most common class in the validation split; a
    model "did not learn" when its best validation accuracy is within three
    binomial standard errors of it (or within 0.05).
    """
    counts = val["label"].value_counts()
    images = int(counts.sum())
    chance = float(counts.max() / images) if images else float("nan")
    best = float(history["val_accuracy"].max()) if "val_accuracy" in history else float("nan")
    margin = max(0.05, 3.0 * math.sqrt(chance * (1.0 - chance) / images)) if images else float("nan")
    learned = bool(best > chance + margin) if images else True
    steps = int(len(history) * recipe.steps_per_epoch)
    report: dict = {
        "learned": learned,
        "best_val_accuracy": round(best, 4),
        "chance_val_accuracy": round(chance, 4),
        "learned_margin": round(margin, 4),
        "val_images": images,
        "epochs_run": len(history),
        "steps_run": steps,
    }
    if not learned:
        report["advice"] = [
            f"add images: the training split has {recipe.train_images}; a few hundred per class is "
            "where a CNN trained from scratch starts to work",
            "use a transfer model with pretrained weights: train.model: mobilenet_v2 (or efficientnet_b0) "
            "and train.weights: imagenet",
            "tune the recipe: `make tune` searches learning rate, batch size, augmentation and width",
        ]
    return report


def distillation_teacher(
    cfg: PipelineConfig, paths: StagePaths, names: list[str], dist: distribute.Distribution
) -> Teacher | None:
    """The teacher of `train.distill`, loaded (inside the strategy's scope), or None without one."""
    if cfg.train.distill is None:
        return None
    if dist.multi_worker:
        raise ConfigError(
            "train.distill: distillation runs on one machine (one device or mirrored GPUs); "
            "unset TF_CONFIG or train.distribution: multi_worker"
        )
    return load_teacher(cfg.train.distill, cfg.mlflow, paths.root, names)


def distill_summary(cfg: PipelineConfig, teacher: Teacher) -> dict:
    """What the training report says about the teacher and the distillation params."""
    assert cfg.train.distill is not None
    return {
        **teacher.describe(),
        "temperature": cfg.train.distill.temperature,
        "alpha": cfg.train.distill.alpha,
    }


def _train(
    cfg: PipelineConfig,
    paths: StagePaths,
    dist: distribute.Distribution,
    callbacks: Sequence[keras.callbacks.Callback],
) -> TrainResult:
    prepared = prepare(cfg.train, paths, dist)
    splits, names, recipe = prepared.splits, prepared.names, prepared.recipe
    dist = dataclasses.replace(dist, global_batch_size=recipe.global_batch_size)
    with dist.strategy.scope():
        built = build_model(cfg.train, len(names), paths.root, recipe.image_size, dist.replicas)
        teacher = distillation_teacher(cfg, paths, names, dist)
    backup = paths.train_backup / run_fingerprint(cfg.train, paths)
    if not dist.chief:  # per-worker resume state, on the same (shared) storage
        backup = backup / "workers" / dist.worker
    backup.mkdir(parents=True, exist_ok=True)
    active, resumed = (
        start_or_resume_run(cfg, paths, backup) if dist.chief else (contextlib.nullcontext(), False)
    )
    with active as run_, dist.strategy.scope():
        if dist.chief and not resumed:
            log_run_context(cfg, paths, splits, built, dist, recipe)
            if teacher is not None:
                mlflow.set_tags({f"distill.teacher_{k}": str(v) for k, v in teacher.describe().items()})
                mlflow.log_params({"distill.teacher_version": teacher.version or "file"})
        outputs = Outputs(
            checkpoint=paths.checkpoint if dist.chief else backup / "keras" / "checkpoint.keras",
            tensorboard=paths.tensorboard if dist.chief else None,
            chief=dist.chief,
        )
        fit_phases(
            built,
            prepared.train,
            prepared.val,
            cfg.train,
            recipe,
            backup,
            outputs,
            class_weights(splits["train"], names, cfg.train),
            dist,
            callbacks,
            teacher.model if teacher is not None else None,
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
        learned = learning_report(history, splits["val"], recipe)
        distilled = {} if teacher is None else {"distill": distill_summary(cfg, teacher)}
        write_report({"recipe": recipe.as_dict(), **learned, **distilled}, paths.train_report)
        mlflow.log_metrics({"steps_run": learned["steps_run"], "learned": float(learned["learned"])})
        mlflow.log_artifact(str(history_path), "reports")
        mlflow.log_artifact(str(paths.train_report), "reports")
        tracking.write_run_file(paths, run_)
    shutil.rmtree(backup, ignore_errors=True)
    log.info(
        "trained %s for %d epochs, %d steps (best val accuracy %.4f) -> %s",
        cfg.train.model,
        len(history),
        learned["steps_run"],
        learned["best_val_accuracy"],
        paths.relative(paths.keras_model),
    )
    if not learned["learned"]:
        log.warning(
            "the model did not learn: best validation accuracy %.3f after %d steps, chance is %.3f "
            "(the most common class). Try: %s. Details: %s",
            learned["best_val_accuracy"],
            learned["steps_run"],
            learned["chance_val_accuracy"],
            "; ".join(learned["advice"]),
            paths.relative(paths.train_report),
        )
    assert run_ is not None  # the chief always has its MLflow run
    best = learned["best_val_accuracy"]
    return TrainResult(paths.keras_model, run_.info.run_id, len(history), best, resumed)


@dataclass(frozen=True)
class Candidate:
    """A model trained for a hyperparameter trial: history and recipe, nothing written to the workspace."""

    model: keras.Model
    history: pd.DataFrame
    recipe: Recipe
    best_val_accuracy: float


def fit_candidate(
    cfg: TrainConfig, paths: StagePaths, workdir: Path, callbacks: Sequence[keras.callbacks.Callback] = ()
) -> Candidate:
    """Train on the train split and validate on val, as the train stage does, without its outputs.

    For tuning (pipeline/tune/): checkpoints, resume state and CSV history go
    under `workdir`; per-epoch metrics go to the active MLflow run (the trial's
    nested run), and `callbacks` (a pruning callback) see every epoch's logs.
    """
    dist = distribute.setup(cfg)
    keras.utils.set_random_seed(cfg.seed)
    with op_determinism():
        prepared = prepare(cfg, paths, dist)
        with dist.strategy.scope():
            size = prepared.recipe.image_size
            built = build_model(cfg, len(prepared.names), paths.root, size, dist.replicas)
            outputs = Outputs(workdir / "checkpoint.keras", None, mlflow.active_run() is not None)
            fit_phases(
                built,
                prepared.train,
                prepared.val,
                cfg,
                prepared.recipe,
                workdir,
                outputs,
                class_weights(prepared.splits["train"], prepared.names, cfg),
                dist,
                callbacks,
            )
    history = history_frame(workdir)
    best = float(history["val_accuracy"].max())
    return Candidate(built.model, history, prepared.recipe, best)

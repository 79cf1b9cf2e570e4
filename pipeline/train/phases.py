"""The training phases: one for the small CNN; head, then fine-tuning, for transfer models.

Each phase is a `fit` (or the multi-worker loop) with its own callbacks; a
finished head phase is kept so that a run killed while fine-tuning resumes
there. The per-epoch history of all phases is read back from the CSVLogger
files for the training report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from pipeline.config import TrainConfig
from pipeline.train.callbacks import history_file, training_callbacks
from pipeline.train.distill import distiller
from pipeline.train.distribute import Distribution
from pipeline.train.loop import fit_multi_worker
from pipeline.train.models import BuiltModel, unfreeze_top
from pipeline.train.recipe import Phase, Recipe

log = logging.getLogger(__name__)

PHASES = ("train", "head", "fine_tune")


def warn_class_weights_dropped(weights: dict[int, float] | None) -> None:
    """keras.distillation.Distiller drops sample weights from its loss: say so (they are not passed)."""
    if weights is not None:
        log.warning(
            "train.class_weights: %d class weights are not applied while distilling "
            "(keras.distillation.Distiller ignores sample weights); the student learns from the teacher's "
            "soft targets and the hard labels unweighted. Set train.distill: null to train with them.",
            len(weights),
        )


def class_weights(train: pd.DataFrame, names: list[str], cfg: TrainConfig) -> dict[int, float] | None:
    """Balanced class weights when asked, or (auto) when the classes are imbalanced."""
    counts = train["label"].value_counts()
    imbalanced = counts.max() / counts.min() > cfg.imbalance_threshold
    if cfg.class_weights == "none" or (cfg.class_weights == "auto" and not imbalanced):
        return None
    labels = np.array([names.index(label) for label in train["label"]])
    weights = compute_class_weight("balanced", classes=np.arange(len(names)), y=labels)
    return {i: float(w) for i, w in enumerate(weights)}


def history_frame(backup: Path) -> pd.DataFrame:
    """One row per epoch across phases and resumes, from the CSVLogger files (epochs 1-based)."""
    frames = []
    for phase in PHASES:
        log_file = history_file(backup, phase)
        if log_file.is_file():
            frames.append(pd.read_csv(log_file).assign(phase=phase))
    history = pd.concat(frames).drop_duplicates("epoch", keep="last")
    history["epoch"] += 1
    return history[["epoch", "phase", *[c for c in history.columns if c not in {"epoch", "phase"}]]]


def learning_rate_schedule(budget: Phase) -> keras.optimizers.schedules.LearningRateSchedule:
    """Linear warmup to the peak over the phase's warmup steps, then a cosine to zero at its last step."""
    decay = max(budget.steps - budget.warmup_steps, 1)
    if budget.warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(budget.peak_learning_rate, decay)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay, warmup_target=budget.peak_learning_rate, warmup_steps=budget.warmup_steps
    )


def _compile(model: keras.Model, budget: Phase, cfg: TrainConfig) -> None:
    # Under a mixed_float16 policy Keras wraps the optimizer in a LossScaleOptimizer itself.
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate_schedule(budget), weight_decay=cfg.weight_decay),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=cfg.jit_compile,
    )


def _fit(
    model: keras.Model,
    dist: Distribution,
    cfg: TrainConfig,
    train: tf.data.Dataset,
    val: tf.data.Dataset,
    *,
    epochs: int,
    steps_per_epoch: int,
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
            steps_per_epoch=steps_per_epoch,
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
        steps_per_epoch=steps_per_epoch,  # the training dataset repeats: an epoch is the recipe's steps
        class_weight=class_weight,
        callbacks=list(callbacks),
        shuffle=False,  # the dataset reshuffles itself every pass (pipeline/train/data.py)
        verbose=2,
    )


@dataclass(frozen=True)
class Outputs:
    """Where a training process writes its best checkpoint and TensorBoard logs."""

    checkpoint: Path
    tensorboard: Path | None
    chief: bool


def fit_phases(
    built: BuiltModel,
    train: tf.data.Dataset,
    val: tf.data.Dataset,
    cfg: TrainConfig,
    recipe: Recipe,
    backup: Path,
    outputs: Outputs,
    weights: dict[int, float] | None,
    dist: Distribution,
    extra: Sequence[keras.callbacks.Callback] = (),
    teacher: keras.Model | None = None,
) -> None:
    """Train: one phase for the small CNN; head then fine-tuning for transfer models.

    With a `teacher` (train.distill), every phase fits a keras.distillation
    Distiller around the model, which trains the model's own weights.

    A finished head phase is saved under `backup`, so a run killed during
    fine-tuning resumes there instead of redoing the head. Only the chief
    writes checkpoints and TensorBoard logs where users look; other workers
    keep theirs under `backup`.
    """
    model, base = built.model, built.base
    if teacher is not None and cfg.distill is not None:
        model = distiller(teacher, model, cfg.distill)
        warn_class_weights_dropped(weights)
        weights = None
    first_phase = "train" if base is None else "head"
    head_done = backup / "head.weights.h5"

    def run_phase(phase: str, budget: Phase, initial_epoch: int) -> None:
        callbacks = training_callbacks(
            budget, phase, backup, outputs.checkpoint, outputs.tensorboard, outputs.chief, initial_epoch
        )
        _fit(
            model,
            dist,
            cfg,
            train,
            val,
            epochs=initial_epoch + budget.epochs,
            steps_per_epoch=recipe.steps_per_epoch,
            initial_epoch=initial_epoch,
            class_weight=weights,
            callbacks=[*callbacks, *extra],
        )

    if base is not None:
        base.trainable = False
    _compile(model, recipe.first, cfg)
    if head_done.is_file():
        log.info("head phase already finished in an earlier run; loading %s", head_done)
        model.load_weights(head_done)
    else:
        run_phase(first_phase, recipe.first, 0)
        if base is not None:
            model.save_weights(head_done)
    if base is not None and recipe.fine_tune is not None:
        unfrozen = unfreeze_top(base, cfg.fine_tune.layers)
        log.info(
            "fine-tuning %d base layers at peak learning rate %g",
            unfrozen,
            recipe.fine_tune.peak_learning_rate,
        )
        _compile(model, recipe.fine_tune, cfg)
        # BackupAndRestore leaves the head phase's restored epoch on the model, and fit() prefers it
        # over initial_epoch; clear it so fine-tuning starts where it should.
        model._initial_epoch = None
        run_phase("fine_tune", recipe.fine_tune, recipe.first.epochs)

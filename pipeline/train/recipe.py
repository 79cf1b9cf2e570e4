"""What the training defaults decide for a dataset: input size, batch size, steps and schedule.

The recipe is counted in optimizer steps, not epochs: a 168-image folder at
batch 64 makes an epoch of 3 steps, and patience or learning-rate schedules
counted in such epochs give up before the model has seen anything. So:

- the per-replica batch halves (down to `min_batch_size`) while a pass over
  the training data has fewer than `min_steps_per_epoch` steps, and an epoch
  that is still shorter repeats the reshuffled, re-augmented data until it
  has them;
- a phase runs `epochs` such epochs, but never fewer than `min_steps` steps
  nor more than `max_steps`;
- the learning rate warms up linearly over `warmup_fraction` of the steps,
  then follows a cosine to zero. A fixed schedule needs no validation signal
  (which is noisy on a small validation split, and drove ReduceLROnPlateau to
  cut the rate after 9 steps); the cosine tail anneals whatever the length;
- early stopping watches `val_loss` with a patience in steps, and never stops
  before `min_steps`.

`image_size: auto` picks the input from the median short side of the
training images, rounded to 16 px and clamped: 32-64 px for the small CNN
(8x8 digits still train at 32; above 40 px the CNN starts with a learned
stride-2 convolution, so a 64-px input costs what a 32-px one does while
keeping twice the detail; beyond 64 a pretrained transfer model is the tool),
96-224 px in steps of 32 for the keras.applications bases (the sizes their
ImageNet weights come in).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from pipeline.config import TrainConfig
from pipeline.errors import PipelineError

SMALL_CNN_SIZES = (32, 64)
TRANSFER_SIZES = (96, 224)


@dataclass(frozen=True)
class Phase:
    """The optimizer-step budget of one training phase."""

    epochs: int
    steps: int
    warmup_steps: int
    peak_learning_rate: float
    start_from_epoch: int  # early stopping watches from this epoch on (min_steps reached)
    patience_epochs: int


@dataclass(frozen=True)
class Recipe:
    """The effective training values for one dataset (logged to MLflow and written to reports/train.json)."""

    image_size: int
    image_size_rule: str
    train_images: int
    batch_size: int  # per replica
    global_batch_size: int
    steps_per_epoch: int
    passes_per_epoch: float  # > 1 when a small set repeats within an epoch
    first: Phase
    fine_tune: Phase | None

    def as_dict(self) -> dict:
        return asdict(self)

    def flat(self) -> dict[str, str]:
        """`recipe.*` keys for MLflow params."""
        flat: dict[str, str] = {}

        def walk(prefix: str, value: object) -> None:
            if isinstance(value, dict):
                for key, item in value.items():
                    walk(f"{prefix}.{key}", item)
            else:
                flat[prefix] = str(value)

        walk("recipe", self.as_dict())
        return flat


def auto_image_size(cfg: TrainConfig, sides: pd.Series) -> tuple[int, str]:
    """The input size: params' number, or (auto) the median short side rounded to 16 and clamped."""
    if cfg.image_size != "auto":
        return int(cfg.image_size), "params"
    low, high = SMALL_CNN_SIZES if cfg.model == "small_cnn" else TRANSFER_SIZES
    step = 16 if cfg.model == "small_cnn" else 32
    median = float(np.median(sides)) if len(sides) else float(low)
    size = int(min(max(round(median / step) * step, low), high))
    return size, f"auto: median short side {median:g} px -> {size} (range {low}-{high})"


def batch_size_for(cfg: TrainConfig, train_images: int, replicas: int) -> int:
    """The per-replica batch: halved from batch_size while an epoch would have too few steps."""
    batch = cfg.batch_size
    too_few = lambda b: math.ceil(train_images / (b * replicas)) < cfg.min_steps_per_epoch  # noqa: E731
    while batch > cfg.min_batch_size and too_few(batch):
        batch = max(batch // 2, cfg.min_batch_size)
    return batch


def _phase(cfg: TrainConfig, epochs: int, steps_per_epoch: int, learning_rate: float) -> Phase:
    steps = min(max(epochs * steps_per_epoch, cfg.min_steps), cfg.max_steps)
    epochs = max(math.ceil(steps / steps_per_epoch), 1)  # whole epochs: at least min_steps ...
    if epochs * steps_per_epoch > cfg.max_steps:  # ... and at most max_steps (one epoch at the least)
        epochs = max(cfg.max_steps // steps_per_epoch, 1)
    steps = epochs * steps_per_epoch
    return Phase(
        epochs=epochs,
        steps=steps,
        warmup_steps=int(round(cfg.warmup_fraction * steps)),
        peak_learning_rate=learning_rate,
        start_from_epoch=min(math.ceil(cfg.min_steps / steps_per_epoch), epochs),
        patience_epochs=max(math.ceil(cfg.patience_steps / steps_per_epoch), 1),
    )


def plan(
    cfg: TrainConfig,
    train_sides: pd.Series,
    replicas: int,
    learning_rate: float,
    fine_tune_learning_rate: float,
) -> Recipe:
    """The recipe for a training split.

    Args:
        cfg: the `train` section.
        train_sides: the short side (min of width, height) of every training image, in pixels.
        replicas: devices training together (the global batch is batch x replicas).
        learning_rate: the (replica-scaled) peak learning rate of the first phase.
        fine_tune_learning_rate: the same for fine-tuning.
    """
    size, rule = auto_image_size(cfg, train_sides)
    images = len(train_sides)
    batch = batch_size_for(cfg, images, replicas)
    global_batch = batch * replicas
    passes = max(math.ceil(images / global_batch), 1)
    steps_per_epoch = max(passes, cfg.min_steps_per_epoch)
    fine_tune = None
    if cfg.model != "small_cnn" and cfg.fine_tune.epochs > 0:
        fine_tune = _phase(cfg, cfg.fine_tune.epochs, steps_per_epoch, fine_tune_learning_rate)
    return Recipe(
        image_size=size,
        image_size_rule=rule,
        train_images=images,
        batch_size=batch,
        global_batch_size=global_batch,
        steps_per_epoch=steps_per_epoch,
        passes_per_epoch=round(steps_per_epoch * global_batch / max(images, 1), 3),
        first=_phase(cfg, cfg.epochs, steps_per_epoch, learning_rate),
        fine_tune=fine_tune,
    )


def short_sides(split: pd.DataFrame, manifest: pd.DataFrame) -> pd.Series:
    """The short side of each image of a split, from the manifest's width and height columns."""
    sizes = manifest.set_index("path")[["width", "height"]]
    joined = sizes.reindex(split["path"])
    missing = joined["width"].isna()
    if missing.any():
        first = split["path"][missing.to_numpy()].iloc[0]
        raise PipelineError(f"{first}: in the split but not in the manifest; rerun `dvc repro split`")
    return joined.min(axis=1).astype(int).reset_index(drop=True)

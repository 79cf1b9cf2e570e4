"""Knowledge distillation as a training mode: keras.distillation.Distiller around the configured model.

The pipeline's models end in a softmax, and Keras' LogitsDistillation wants
logits: log-probabilities are logits (softmax(log p / T) is the teacher's
softmax at temperature T), so the loss takes the log of both models' outputs.
A teacher with another input size gets a Resizing layer in front of it.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import distillation

from pipeline.config import DistillConfig

EPSILON = 1e-7  # probabilities are clipped before the log: a saturated softmax gives 0 exactly


@keras.saving.register_keras_serializable(package="pipeline")
class ProbabilityDistillation(distillation.LogitsDistillation):
    """LogitsDistillation for models whose outputs are softmax probabilities (KL at temperature T, x T^2).

    The KL loss is given as a `keras.losses.KLDivergence` instance: Keras 3.15's
    default, the string "kl_divergence", resolves to the plain function, which
    LogitsDistillation then applies to the raw logits instead of their softmax
    (negative values, clipped: a loss of 0 and no soft targets at all).
    """

    def __init__(self, temperature: float = 2.0, loss: Any = None) -> None:
        super().__init__(temperature=temperature, loss=loss or keras.losses.KLDivergence())

    def compute_loss(self, teacher_outputs: Any, student_outputs: Any, **kwargs: Any) -> Any:
        def logits(probabilities: Any) -> Any:
            return keras.ops.log(keras.ops.clip(probabilities, EPSILON, 1.0))

        return super().compute_loss(logits(teacher_outputs), logits(student_outputs), **kwargs)


def at_input_size(teacher: keras.Model, image_size: int) -> keras.Model:
    """The teacher as a model taking the student's input size (resized inside, as serving resizes)."""
    if tuple(teacher.input_shape[1:3]) == (image_size, image_size):
        return teacher
    side = int(teacher.input_shape[1])
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    resized = keras.layers.Resizing(side, side, interpolation="bilinear", name="teacher_resize")(inputs)
    return keras.Model(inputs, teacher(resized, training=False), name="teacher")


def distiller(teacher: keras.Model, student: keras.Model, cfg: DistillConfig) -> distillation.Distiller:
    """The student learning alpha x cross-entropy on labels + (1 - alpha) x the soft-target loss."""
    teacher.trainable = False
    side = int(student.input_shape[1])
    trainer = distillation.Distiller(
        teacher=at_input_size(teacher, side),
        student=student,
        distillation_losses=[ProbabilityDistillation(temperature=cfg.temperature)],
        student_loss_weight=cfg.alpha,
        name="distiller",
    )
    trainer(keras.ops.zeros((1, side, side, 3)))  # built before fit: BackupAndRestore requires it
    return trainer

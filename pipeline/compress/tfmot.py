"""Quantization-aware training and magnitude pruning with tensorflow-model-optimization.

Both fine-tune a tf_keras copy of the trained Keras 3 model (tfmot 0.8 does not
wrap Keras 3 models) on the train split, then convert it to a full-integer
int8 TFLite model the same way post-training quantization does (uint8 pixels
in, calibrated on the same train images), so the variants compare like for like.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.compress.tf_keras_copy import to_tf_keras

log = logging.getLogger(__name__)

LEGACY_KERAS = "TF_USE_LEGACY_KERAS"


def _tfmot() -> Any:
    """tensorflow_model_optimization, imported without switching the process to Keras 2.

    Its import sets TF_USE_LEGACY_KERAS=1 for the whole process: `tf.keras`,
    when first touched after that, is tf_keras, and MLflow's Keras flavor (which
    checks models against `tensorflow.keras.Model`) then refuses the Keras 3
    model at register ("Unknown model type"); child processes would inherit it
    too. So `tf.keras` is bound to Keras 3 first, and the variable is restored.
    """
    import tensorflow as tf

    tf.keras.Model  # noqa: B018  (binds TensorFlow's lazy `tf.keras` to Keras 3 before tfmot's import)
    before = os.environ.get(LEGACY_KERAS)
    try:
        import tensorflow_model_optimization
    finally:
        if before is None:
            os.environ.pop(LEGACY_KERAS, None)
        else:
            os.environ[LEGACY_KERAS] = before
    return tensorflow_model_optimization


@dataclass(frozen=True)
class TrainingData:
    """In-memory train split (pixels 0..255) and labels, and the images that calibrate int8."""

    images: np.ndarray
    labels: np.ndarray
    calibration: np.ndarray


def _annotated(model: Any) -> Any:
    """The model with every layer tfmot's default 8-bit scheme supports annotated for QAT.

    Others (a Rescaling layer) stay float in training and are quantized by the
    converter from the calibration images.
    """
    tfmot = _tfmot()
    import tf_keras

    registry = tfmot.quantization.keras.default_8bit.Default8BitQuantizeRegistry()

    def annotate(layer: Any) -> Any:
        if isinstance(layer, tf_keras.layers.InputLayer) or not registry.supports(layer):
            return layer
        return tfmot.quantization.keras.quantize_annotate_layer(layer)

    return tf_keras.models.clone_model(model, clone_function=annotate)


def full_integer(converter: Any, calibration: np.ndarray) -> Any:
    """Set a TFLite converter to full-integer int8 with uint8 pixels in, calibrated on `calibration`.

    The one int8 recipe: export's post-training variant and the QAT and pruned ones all use it.
    """
    import tensorflow as tf

    def representative() -> Any:
        for image in calibration:
            yield [image[None].astype(np.float32)]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8  # raw pixels 0..255 need no scaling
    return converter


def int8_tflite(model: Any, calibration: np.ndarray) -> bytes:
    """A tf_keras model as full-integer int8 TFLite (as export's PTQ variant)."""
    import tensorflow as tf

    flat: bytes = full_integer(tf.lite.TFLiteConverter.from_keras_model(model), calibration).convert()
    return flat


def quantization_aware(model: Any, data: TrainingData, epochs: int, learning_rate: float, seed: int) -> bytes:
    """Fine-tune a fake-quantized tf_keras copy for `epochs` passes; its int8 TFLite model."""
    tfmot = _tfmot()
    import tf_keras

    tf_keras.utils.set_random_seed(seed)
    copy = to_tf_keras(model, data.calibration[:8])
    with tfmot.quantization.keras.quantize_scope():
        quantized = tfmot.quantization.keras.quantize_apply(_annotated(copy))
    quantized.compile(
        tf_keras.optimizers.Adam(learning_rate), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    history = quantized.fit(
        data.images, data.labels, epochs=epochs, batch_size=32, shuffle=True, verbose=0
    ).history
    log.info("QAT: %d epochs, train accuracy %.4f", epochs, history["accuracy"][-1])
    return int8_tflite(quantized, data.calibration)


@dataclass(frozen=True)
class Pruned:
    """A pruned model's int8 TFLite bytes and the share of zero weights it reached."""

    tflite: bytes
    sparsity: float


def kernel_sparsity(model: Any) -> float:
    """Share of exact zeros over the conv and dense kernels (what pruning acts on)."""
    import tf_keras

    pruned_kinds = (tf_keras.layers.Conv2D, tf_keras.layers.DepthwiseConv2D, tf_keras.layers.Dense)
    kernels = [layer.get_weights()[0] for layer in model.layers if isinstance(layer, pruned_kinds)]
    total = sum(kernel.size for kernel in kernels)
    return float(sum(int((kernel == 0).sum()) for kernel in kernels) / total) if total else 0.0


def prune(
    model: Any,
    data: TrainingData,
    target_sparsity: float,
    epochs: int,
    min_steps: int,
    batch_size: int,
    seed: int,
) -> Pruned:
    """Magnitude pruning to `target_sparsity` (polynomial ramp over the first half, then held), int8 TFLite.

    At least `min_steps` optimizer steps run (a small training set is passed
    over more often than `epochs`), so the network recovers after the ramp.

    The convolution and dense kernels are pruned; the pruning wrappers are
    stripped before conversion, so the file is a normal int8 model whose
    zeros compress (gzip) well.
    """
    tfmot = _tfmot()
    import tf_keras

    tf_keras.utils.set_random_seed(seed)
    sparsity = tfmot.sparsity.keras
    copy = to_tf_keras(model, data.calibration[:8])
    per_epoch = max(1, int(np.ceil(len(data.images) / batch_size)))
    epochs = max(epochs, int(np.ceil(min_steps / per_epoch)))
    steps = per_epoch * epochs
    frequency = max(1, steps // 20)  # about ten mask updates while the sparsity ramps up
    end = frequency * max(1, steps // (2 * frequency))  # a multiple of it: the last update is at the target
    schedule = sparsity.PolynomialDecay(0.0, target_sparsity, begin_step=0, end_step=end, frequency=frequency)
    prunable = (tf_keras.layers.Conv2D, tf_keras.layers.DepthwiseConv2D, tf_keras.layers.Dense)

    def wrap(layer: Any) -> Any:
        if isinstance(layer, prunable):
            return sparsity.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer

    wrapped = tf_keras.models.clone_model(copy, clone_function=wrap)
    wrapped.compile(tf_keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy", metrics=["accuracy"])
    wrapped.fit(
        data.images,
        data.labels,
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        callbacks=[sparsity.UpdatePruningStep()],
        verbose=0,
    )
    stripped = sparsity.strip_pruning(wrapped)
    reached = kernel_sparsity(stripped)
    log.info("pruning: target sparsity %.2f, reached %.4f", target_sparsity, reached)
    return Pruned(int8_tflite(stripped, data.calibration), reached)

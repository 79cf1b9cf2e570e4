"""Keras 3 models: a small CNN, and transfer learning on keras.applications bases.

Every model takes raw RGB pixels (0..255) and starts with its own
preprocessing layers, so exported models need nothing but decode and resize.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from pipeline.config import TrainConfig, resolve_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltModel:
    """The full model and, for transfer learning, its pretrained base."""

    model: keras.Model
    base: keras.Model | None
    weights_source: str


def small_cnn(
    image_size: int, num_classes: int, dropout: float, width: int = 32, synchronized_bn: bool = False
) -> keras.Model:
    """Three conv blocks with batch norm (width, 2x, 4x filters); fast on CPU, about 0.99 on the digits.

    Inputs above 40 px start with a learned stride-2 convolution, so a 64-px
    input costs about what a 32-px one does and keeps what a resize would blur.
    With several replicas, `synchronized_bn` computes batch statistics over the
    global batch, so every replica (and worker) keeps the same moving averages.
    """
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = layers.Rescaling(1.0 / 255.0, name="preprocess")(inputs)
    if image_size > 40:
        x = layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name="stem")(x)
        x = layers.BatchNormalization(momentum=0.9, synchronized=synchronized_bn)(x)
        x = layers.Activation("relu")(x)
    for filters in (width, 2 * width, 4 * width):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9, synchronized=synchronized_bn)(x)  # momentum: few steps
        x = layers.Activation("relu")(x)
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x) if x.shape[1] > 4 else x
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def caffe_preprocess(image_size: int) -> layers.Layer:
    """ResNet50's 'caffe' preprocessing (RGB to BGR, subtract ImageNet means) as a frozen 1x1 conv.

    A built-in layer instead of a Lambda keeps the model serialisable without custom code.
    """
    conv = layers.Conv2D(3, 1, name="preprocess", trainable=False)
    conv.build((None, image_size, image_size, 3))
    swap = np.zeros((1, 1, 3, 3), dtype=np.float32)
    for rgb, bgr in ((0, 2), (1, 1), (2, 0)):
        swap[0, 0, rgb, bgr] = 1.0
    conv.set_weights([swap, -np.array([103.939, 116.779, 123.68], dtype=np.float32)])
    return conv


def _base_model(name: str, image_size: int, weights: str | None) -> tuple[keras.Model, layers.Layer | None]:
    shape = (image_size, image_size, 3)
    apps = keras.applications
    if name == "mobilenet_v2":
        return apps.MobileNetV2(include_top=False, weights=weights, input_shape=shape), layers.Rescaling(
            1.0 / 127.5, offset=-1.0, name="preprocess"
        )
    if name == "efficientnet_b0":  # EfficientNet rescales and normalises inside the base
        return apps.EfficientNetB0(include_top=False, weights=weights, input_shape=shape), None
    if name == "resnet50":
        return apps.ResNet50(include_top=False, weights=weights, input_shape=shape), caffe_preprocess(
            image_size
        )
    raise ValueError(f"train.model: unknown model {name!r}")


def transfer_model(cfg: TrainConfig, num_classes: int, root: Path, image_size: int) -> BuiltModel:
    """A keras.applications base with a new softmax head.

    `weights: imagenet` downloads through Keras (real code, needs network);
    a file path loads base weights saved with `base.save_weights(...)`.
    """
    keras_weights = "imagenet" if cfg.weights == "imagenet" else None
    base, preprocess = _base_model(cfg.model, image_size, keras_weights)
    source = cfg.weights
    if cfg.weights not in {"none", "imagenet"}:
        path = resolve_path(cfg.weights, root)
        base.load_weights(path)
        source = str(path)
    elif cfg.weights == "none":
        log.warning("train.weights is none: %s base starts from random weights", cfg.model)
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = preprocess(inputs) if preprocess is not None else inputs
    x = base(x, training=False)  # BatchNorm stays in inference mode, also when fine-tuning
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(cfg.dropout)(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return BuiltModel(keras.Model(inputs, outputs, name=cfg.model), base, source)


def build_model(
    cfg: TrainConfig, num_classes: int, root: Path, image_size: int, replicas: int = 1
) -> BuiltModel:
    """The model named in params at the recipe's input size (batch norm synchronised across replicas)."""
    if cfg.model == "small_cnn":
        model = small_cnn(image_size, num_classes, cfg.dropout, cfg.width, replicas > 1)
        return BuiltModel(model, None, "none")
    return transfer_model(cfg, num_classes, root, image_size)


def unfreeze_top(base: keras.Model, count: int) -> int:
    """Make the top `count` layers of the base trainable, BatchNorm excepted.

    Returns:
        How many layers became trainable.
    """
    base.trainable = True
    boundary = max(len(base.layers) - count, 0)
    unfrozen = 0
    for position, layer in enumerate(base.layers):
        layer.trainable = position >= boundary and not isinstance(layer, layers.BatchNormalization)
        unfrozen += layer.trainable
    return unfrozen


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
    size = int(model.input_shape[1])
    twin = build_model(cfg.model_copy(update={"weights": "none"}), num_classes, root, size).model
    twin.set_weights(model.get_weights())
    return twin

"""Training augmentation: one fused random affine warp per image, channel order, brightness and contrast.

Rotation, zoom, translation and flips are composed into a single projective
transform per image and applied in one `ImageProjectiveTransformV3` call over
the batch, instead of one resampling pass per Keras preprocessing layer: on
2 CPU cores at 224x224 that is what lets the input pipeline keep up (see
bench/input_pipeline.py). The ranges mean what the Keras layers' factors
mean: rotation as a fraction of a full turn, zoom and translation as
fractions of the image size, brightness as a fraction of the 0-255 range,
contrast as a factor range around 1. Random draws are stateless, from a seed
per batch, so a run is reproducible.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from functools import partial

import tensorflow as tf

from pipeline.config import AugmentConfig

Augment = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def _uniform(shape, seed, low: float, high: float) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed, minval=low, maxval=high)


def _flip_signs(count, seed, enabled: bool) -> tf.Tensor:
    if not enabled:
        return tf.ones([count])
    return tf.where(_uniform([count], seed, 0.0, 1.0) < 0.5, -1.0, 1.0)


def affine_transforms(cfg: AugmentConfig, count, height, width, seeds) -> tf.Tensor:
    """(count, 8) projective transforms mapping output pixels to input points, about the centre."""
    angle = _uniform([count], seeds[0], -cfg.rotation * 2 * math.pi, cfg.rotation * 2 * math.pi)
    zoom = _uniform([count], seeds[1], 1.0 - cfg.zoom, 1.0 + cfg.zoom)
    shift_x = _uniform([count], seeds[2], -cfg.translation, cfg.translation) * width
    shift_y = _uniform([count], seeds[3], -cfg.translation, cfg.translation) * height
    flip_x = _flip_signs(count, seeds[4], cfg.flip in {"horizontal", "horizontal_and_vertical"})
    flip_y = _flip_signs(count, seeds[5], cfg.flip in {"vertical", "horizontal_and_vertical"})
    cos, sin = tf.cos(angle), tf.sin(angle)
    a0, a1 = zoom * cos * flip_x, -zoom * sin * flip_y
    b0, b1 = zoom * sin * flip_x, zoom * cos * flip_y
    centre_x, centre_y = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    a2 = centre_x - a0 * centre_x - a1 * centre_y - shift_x
    b2 = centre_y - b0 * centre_x - b1 * centre_y - shift_y
    zeros = tf.zeros([count])
    return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def augment_batch(images: tf.Tensor, seed: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    """Randomly transform a batch of RGB images (0-255); one draw per image.

    Args:
        images: (batch, height, width, 3), uint8 (as the training cache holds them) or float32.
        seed: a shape-[2] integer seed for this batch.
        cfg: the `train.augment` section.

    Returns:
        float32 images in 0-255.
    """
    count = tf.shape(images)[0]
    height, width = tf.cast(tf.shape(images)[1], tf.float32), tf.cast(tf.shape(images)[2], tf.float32)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 9)
    if cfg.rotation or cfg.zoom or cfg.translation or cfg.flip != "none":
        images = tf.raw_ops.ImageProjectiveTransformV3(  # on uint8: a quarter of the memory traffic
            images=images,
            transforms=affine_transforms(cfg, count, height, width, seeds),
            output_shape=tf.shape(images)[1:3],
            fill_value=tf.constant(0.0),
            interpolation="BILINEAR",
            fill_mode="NEAREST",
        )
    images = tf.cast(images, tf.float32)
    if cfg.channel_shuffle:  # one of the 6 orders of R, G, B per image
        orders = tf.constant(list(itertools.permutations(range(3))), dtype=tf.int32)
        pick = tf.random.stateless_uniform([count], seeds[8], minval=0, maxval=6, dtype=tf.int32)
        images = tf.gather(images, tf.gather(orders, pick), axis=3, batch_dims=1)
    if not (cfg.brightness or cfg.contrast):
        return images
    # Brightness (add d) then contrast (scale by f about the image mean m) in one pass:
    # ((x + d) - (m + d)) * f + (m + d) = x * f + (d + m * (1 - f)).
    delta = _uniform([count, 1, 1, 1], seeds[6], -cfg.brightness, cfg.brightness) * 255.0
    factor = _uniform([count, 1, 1, 1], seeds[7], 1.0 - cfg.contrast, 1.0 + cfg.contrast)
    mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True) if cfg.contrast else tf.zeros_like(delta)
    return tf.clip_by_value(images * factor + (delta + mean * (1.0 - factor)), 0.0, 255.0)


def augmentation(cfg: AugmentConfig) -> Augment | None:
    """The augmentation in params as a function of (images, seed), or None when everything is off."""
    warps = cfg.rotation or cfg.zoom or cfg.translation or cfg.flip != "none"
    if not (warps or cfg.brightness or cfg.contrast or cfg.channel_shuffle):
        return None
    return partial(augment_batch, cfg=cfg)

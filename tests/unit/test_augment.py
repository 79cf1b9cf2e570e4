"""The fused augmentation: reproducible per seed, geometric transforms about the centre, ranges kept."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline.config import AugmentConfig
from pipeline.train.augment import augment_batch, augmentation

# Every transform off; each test turns on the one it checks.
OFF = AugmentConfig(
    rotation=0.0, zoom=0.0, translation=0.0, brightness=0.0, contrast=0.0, channel_shuffle=False
)


def images() -> tf.Tensor:
    rng = np.random.default_rng(0)
    return tf.constant(rng.integers(0, 256, (6, 16, 12, 3)), dtype=tf.uint8)


def test_nothing_configured_means_no_augmentation():
    assert augmentation(OFF) is None
    assert augmentation(OFF.model_copy(update={"contrast": 0.1})) is not None
    assert augmentation(OFF.model_copy(update={"channel_shuffle": True})) is not None


def test_channel_shuffle_permutes_each_images_channels_and_nothing_else():
    batch = tf.constant(np.random.default_rng(1).integers(0, 256, (64, 5, 4, 3)), dtype=tf.uint8)
    out = augment_batch(batch, tf.constant([7, 8]), OFF.model_copy(update={"channel_shuffle": True})).numpy()
    orders = []
    for original, shuffled in zip(batch.numpy().astype(np.float32), out, strict=True):
        matches = [
            order
            for order in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
            if np.array_equal(original[..., list(order)], shuffled)
        ]
        assert len(matches) == 1  # pixels untouched, channels in one of the six orders
        orders.append(matches[0])
    assert len(set(orders)) == 6  # every order is drawn over 64 images


def test_the_same_seed_gives_the_same_batch_and_another_seed_another():
    cfg = AugmentConfig(rotation=0.05, zoom=0.1, translation=0.1, brightness=0.1, contrast=0.1)
    first = augment_batch(images(), tf.constant([1, 2]), cfg)
    again = augment_batch(images(), tf.constant([1, 2]), cfg)
    other = augment_batch(images(), tf.constant([3, 4]), cfg)
    assert first.dtype == tf.float32 and first.shape == (6, 16, 12, 3)
    np.testing.assert_array_equal(first.numpy(), again.numpy())
    assert not np.allclose(first.numpy(), other.numpy())
    assert float(tf.reduce_min(first)) >= 0.0 and float(tf.reduce_max(first)) <= 255.0


def test_a_horizontal_flip_mirrors_exactly_about_the_centre():
    batch = images()
    out = augment_batch(batch, tf.constant([5, 6]), OFF.model_copy(update={"flip": "horizontal"})).numpy()
    original, mirrored = batch.numpy().astype(np.float32), batch.numpy()[:, :, ::-1].astype(np.float32)
    flipped = [np.array_equal(o, m) for o, m in zip(out, mirrored, strict=True)]
    kept = [np.array_equal(o, i) for o, i in zip(out, original, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)


def test_brightness_alone_shifts_every_pixel_by_one_amount_per_image():
    batch = tf.fill((4, 8, 8, 3), 100.0)
    out = augment_batch(batch, tf.constant([7, 8]), OFF.model_copy(update={"brightness": 0.1})).numpy()
    for image in out:
        assert np.ptp(image) == 0 and abs(image.flat[0] - 100.0) <= 25.5
    assert len({float(image.flat[0]) for image in out}) == 4

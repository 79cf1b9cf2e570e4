"""Model input from encoded images: the one decoder and resizer every stage and the service use.

Models take raw RGB pixels in 0..255 and carry their own preprocessing, so
`decode_and_resize` is the whole of input preparation. The tf.data training
pipeline, evaluation, the drift profiles, TFLite calibration and the
SavedModel's bytes-in serving signature all call it: they see the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf


def decode_and_resize(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded JPEG/PNG/BMP/GIF/WebP bytes to float32 RGB (size, size, 3) in 0..255."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def load_files(files: Sequence[Path], image_size: int) -> np.ndarray:
    """Image files as one float32 array (N, size, size, 3), in order, decoded as the model expects."""
    if len(files) == 0:
        return np.zeros((0, image_size, image_size, 3), dtype=np.float32)
    dataset = tf.data.Dataset.from_tensor_slices([str(f) for f in files])
    dataset = dataset.map(
        lambda p: decode_and_resize(tf.io.read_file(p), image_size),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return np.stack(list(dataset.as_numpy_iterator()))

"""The tf.data input pipeline: parallel decode, resize, augmentation (training only), cache, prefetch.

Models take raw RGB pixels in 0..255 and carry their own preprocessing, so
the same `decode_and_resize` serves training, evaluation, the SavedModel
signature and TFLite calibration: nothing can skew between them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from pipeline.config import StagePaths
from pipeline.train.augment import Augment

AUTOTUNE = tf.data.AUTOTUNE


def read_split(paths: StagePaths, name: str) -> pd.DataFrame:
    """One split's rows (path, label, ...) as written by the split stage."""
    return pd.read_csv(paths.split_file(name), dtype=str, keep_default_na=False)


def class_names_of(train: pd.DataFrame) -> list[str]:
    """Output order of the model: the sorted labels of the training split."""
    return sorted(train["label"].unique())


def write_class_names(names: list[str], path: Path) -> None:
    """Store the model's output order next to the model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(names) + "\n", encoding="utf-8")


def read_class_names(path: Path) -> list[str]:
    """The output order written by train."""
    return list(json.loads(path.read_text(encoding="utf-8")))


def decode_and_resize(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded JPEG/PNG/BMP/GIF/WebP bytes to float32 RGB (size, size, 3) in 0..255."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def image_dataset(
    frame: pd.DataFrame,
    root: Path,
    class_names: list[str],
    image_size: int,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    augment: Augment | None = None,
) -> tf.data.Dataset:
    """Batches of (pixels, class index) for one split.

    Args:
        frame: split rows with `path` (relative to root) and `label`.
        root: the project root.
        class_names: output order of the model.
        image_size: side of the square model input.
        batch_size: images per batch.
        shuffle_seed: shuffle every epoch with this seed (training); None keeps file order.
        augment: random transforms (pipeline/train/augment.py) applied per batch after caching,
            so each epoch sees new ones.

    Returns:
        A prefetched dataset; decoded images are cached in memory.
    """
    index = {name: i for i, name in enumerate(class_names)}
    files = [str(root / p) for p in frame["path"]]
    labels = np.array([index[label] for label in frame["label"]], dtype=np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((files, labels))
    dataset = dataset.map(
        lambda path, label: (decode_and_resize(tf.io.read_file(path), image_size), label),
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )
    if augment is not None:  # augmented images are cached as uint8: a quarter of the memory
        dataset = dataset.map(lambda x, y: (tf.cast(tf.round(x), tf.uint8), y), num_parallel_calls=AUTOTUNE)
    dataset = dataset.cache()
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    if augment is not None:  # a reproducible seed per batch for the stateless random draws
        seeds = tf.data.Dataset.random(seed=shuffle_seed or 0).batch(2)
        dataset = tf.data.Dataset.zip((dataset, seeds)).map(
            lambda batch, seed: (augment(batch[0], seed), batch[1]), num_parallel_calls=AUTOTUNE
        )
    return dataset.prefetch(AUTOTUNE)


def load_files(files: Sequence[Path], image_size: int) -> np.ndarray:
    """Image files as one float32 array (N, size, size, 3), in order, decoded as in training."""
    if len(files) == 0:
        return np.zeros((0, image_size, image_size, 3))
    dataset = tf.data.Dataset.from_tensor_slices([str(f) for f in files])
    dataset = dataset.map(
        lambda p: decode_and_resize(tf.io.read_file(p), image_size), num_parallel_calls=AUTOTUNE
    )
    return np.stack(list(dataset.as_numpy_iterator()))


def load_images(frame: pd.DataFrame, root: Path, image_size: int) -> np.ndarray:
    """All images of a split as one float32 array (N, size, size, 3), in file order."""
    return load_files([root / p for p in frame["path"]], image_size)

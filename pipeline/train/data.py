"""The tf.data training input: parallel decode, resize, augmentation (training only), cache, prefetch.

Decoding and resizing is `pipeline.images.decode_and_resize`, the function
evaluation, the drift profiles and the SavedModel's serving signature use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from pipeline.images import decode_and_resize
from pipeline.train.augment import Augment

AUTOTUNE = tf.data.AUTOTUNE


def image_dataset(
    frame: pd.DataFrame,
    root: Path,
    class_names: list[str],
    image_size: int,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    augment: Augment | None = None,
    repeat: bool = False,
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
        repeat: repeat forever (reshuffled each pass), for `fit(steps_per_epoch=...)`: a small
            training set then fills an epoch of the recipe's length (pipeline/train/recipe.py).

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
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(batch_size)
    if augment is not None:  # a reproducible seed per batch for the stateless random draws
        seeds = tf.data.Dataset.random(seed=shuffle_seed or 0).batch(2)
        dataset = tf.data.Dataset.zip((dataset, seeds)).map(
            lambda batch, seed: (augment(batch[0], seed), batch[1]), num_parallel_calls=AUTOTUNE
        )
    return dataset.prefetch(AUTOTUNE)

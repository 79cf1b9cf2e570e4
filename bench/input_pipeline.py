"""Input-pipeline throughput: the training tf.data pipeline against ImageDataGenerator and decode-only.

Writes 5,000 JPEG images of 224x224 (10 classes) to a temporary folder, then
measures images per second, in one run, through:

- decode + resize only (tf.data, parallel): the ceiling of any pipeline that
  reads these files;
- the training pipeline (`pipeline.train.data.image_dataset` with the
  augmentation from params.yaml): first epoch (decode, cache, augment) and a
  second epoch (from the in-memory cache, augment only);
- `tf.keras.preprocessing.image.ImageDataGenerator.flow_from_directory` with the
  same augmentation (the approach in the product's source material).

Prints the rates and the ratios. Targets on 2 CPU cores: the training
pipeline at least 5x ImageDataGenerator and at least 80% of decode-only.

    python bench/input_pipeline.py [--images 5000] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.images import decode_and_resize  # noqa: E402
from pipeline.train.augment import augmentation  # noqa: E402
from pipeline.train.data import AUTOTUNE, image_dataset  # noqa: E402

SIZE = 224
CLASSES = 10


def write_images(folder: Path, count: int) -> pd.DataFrame:
    """`count` JPEGs of 224x224: smooth colour gradients with noise, a different hue per class."""
    rng = np.random.default_rng(0)
    rows = []
    ramp = np.linspace(0, 1, SIZE)
    for index in range(count):
        label = f"class_{index % CLASSES}"
        hue = np.full((SIZE, SIZE), (index % CLASSES) / CLASSES)
        base = np.stack([np.outer(ramp, ramp), np.outer(ramp[::-1], ramp), hue], axis=-1)
        pixels = np.clip(base * 200 + rng.normal(0, 25, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        path = folder / label / f"{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
        rows.append({"path": str(path.relative_to(folder)), "label": label})
    return pd.DataFrame(rows)


def rate(dataset, images: int) -> float:
    """Images per second to iterate the dataset once."""
    start = time.perf_counter()
    for _ in dataset:
        pass
    return images / (time.perf_counter() - start)


def decode_only(folder: Path, frame: pd.DataFrame, batch: int) -> tf.data.Dataset:
    files = [str(folder / p) for p in frame["path"]]
    return (
        tf.data.Dataset.from_tensor_slices(files)
        .map(lambda p: decode_and_resize(tf.io.read_file(p), SIZE), num_parallel_calls=AUTOTUNE)
        .batch(batch)
        .prefetch(AUTOTUNE)
    )


def image_data_generator(folder: Path, batch: int, augment) -> tuple[object, int]:
    """flow_from_directory with the params' augmentation, as close as its options allow."""
    generator = tf.keras.preprocessing.image.ImageDataGenerator(
        rotation_range=augment.rotation * 360,
        zoom_range=augment.zoom,
        width_shift_range=augment.translation,
        height_shift_range=augment.translation,
        brightness_range=(1 - augment.brightness, 1 + augment.brightness),
        horizontal_flip=augment.flip in {"horizontal", "horizontal_and_vertical"},
        vertical_flip=augment.flip in {"vertical", "horizontal_and_vertical"},
        fill_mode="nearest",
    )
    flow = generator.flow_from_directory(
        str(folder), target_size=(SIZE, SIZE), batch_size=batch, class_mode="sparse", shuffle=True, seed=0
    )
    return flow, len(flow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    cfg = load_config(ROOT / "params.yaml", ROOT)
    names = [f"class_{i}" for i in range(CLASSES)]
    with tempfile.TemporaryDirectory(prefix="bench-input-") as scratch:
        folder = Path(scratch)
        start = time.perf_counter()
        frame = write_images(folder, args.images)
        print(f"wrote {args.images} JPEGs of {SIZE}x{SIZE} in {time.perf_counter() - start:.1f} s")
        print(f"CPUs: {os.cpu_count()}, batch {args.batch}, augmentation: {cfg.train.augment.model_dump()}\n")

        ceiling = rate(decode_only(folder, frame, args.batch), args.images)
        training = image_dataset(
            frame,
            folder,
            names,
            SIZE,
            args.batch,
            shuffle_seed=0,
            augment=augmentation(cfg.train.augment),
        )
        first = rate(training, args.images)
        second = rate(training, args.images)
        flow, batches = image_data_generator(folder, args.batch, cfg.train.augment)
        start = time.perf_counter()
        for index in range(batches):
            flow[index]
        legacy = args.images / (time.perf_counter() - start)

    print("pipeline                                   | images/s")
    print("-------------------------------------------+---------")
    print(f"decode + resize only (ceiling)             | {ceiling:8.1f}")
    print(f"training pipeline, epoch 1 (decode+augment)| {first:8.1f}")
    print(f"training pipeline, epoch 2 (cache+augment) | {second:8.1f}")
    print(f"ImageDataGenerator.flow_from_directory     | {legacy:8.1f}")
    print()
    print(f"training epoch 1 / ImageDataGenerator : {first / legacy:6.2f}  (target >= 5)")
    print(f"training epoch 2 / ImageDataGenerator : {second / legacy:6.2f}")
    print(f"training epoch 1 / decode-only ceiling: {first / ceiling:6.2f}  (target >= 0.80)")
    print(f"training epoch 2 / decode-only ceiling: {second / ceiling:6.2f}")


if __name__ == "__main__":
    main()

"""Input-pipeline throughput: the training tf.data pipeline, the same work without it, ImageDataGenerator.

Writes 5,000 JPEG images of 224x224 (10 classes) to a temporary folder, then
measures images per second through three variants, `--repeats` times each, in
an order that rotates every repeat (A B C, B C A, ...) so that a slow
spell of the machine does not land on one variant:

- ceiling: the same work as the training pipeline with none of tf.data's
  machinery. One `tf.function` per batch reads, decodes and resizes each file
  (`pipeline.images.decode_and_resize`), rounds to uint8 as the training cache
  does, and applies the params' augmentation (`pipeline.train.augment`) with
  the same seeds-per-batch scheme; one Python worker thread per CPU core
  calls it on the batches in turn. No cache, shuffle, prefetch or per-element
  dataset ops. It also times the second half of that work alone: the same
  augmentation over the decoded images held in memory (the ceiling for a
  cached epoch). These are not proven bounds (a better scheduler could beat
  plain threads), but they are the same ops on the same images, so a ratio
  below 1 is what tf.data costs and a ratio above 1 means tf.data schedules
  the work better than plain threads do.
- the training pipeline (`pipeline.train.data.image_dataset` with the
  augmentation from params.yaml), built afresh every repeat: epoch 1 (decode,
  fill the cache, augment) and epoch 2 (from the in-memory cache, augment
  only);
- `tf.keras.preprocessing.image.ImageDataGenerator.flow_from_directory` with
  the same augmentation as far as its options go (no contrast, no channel
  shuffle): the approach in the product's source material.

Prints each repeat's figures, then the median and the range (min-max) per
figure and the ratios of the medians. Targets on 2 CPU cores: the training
pipeline at least 5x ImageDataGenerator and at least 80% of the ceiling.
The JPEGs are in the OS page cache for every variant (just written).

    python bench/input_pipeline.py [--images 5000] [--batch 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from bench.provenance import header  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.images import decode_and_resize  # noqa: E402
from pipeline.train.augment import Augment, augmentation  # noqa: E402
from pipeline.train.data import image_dataset  # noqa: E402

SIZE = 224
CLASSES = 10
CEILING = "ceiling: decode + augment, no tf.data"
CEILING_CACHED = "ceiling: augment decoded images, no tf.data"
EPOCH_1 = "training pipeline, epoch 1 (decode+augment)"
EPOCH_2 = "training pipeline, epoch 2 (cache+augment)"
LEGACY = "ImageDataGenerator.flow_from_directory"


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


def threaded_rate(work: Callable[[int], object], batches: int, images: int) -> float:
    """Images per second to call `work` on every batch index, one worker thread per CPU core."""
    start = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for _ in pool.map(work, range(batches)):
            pass
    return images / (time.perf_counter() - start)


def to_cached(image: tf.Tensor) -> tf.Tensor:
    """What the training cache holds when augmenting: the decoded image rounded to uint8."""
    return tf.cast(tf.round(image), tf.uint8)


def decode_augment(augment: Augment) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """The training pipeline's per-batch work as one graph: read, decode, resize, uint8, augment."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([2], tf.int64)])
    def work(files: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        images = tf.map_fn(
            lambda file: to_cached(decode_and_resize(tf.io.read_file(file), SIZE)),
            files,
            fn_output_signature=tf.TensorSpec([SIZE, SIZE, 3], tf.uint8),
        )
        return augment(images, seed)

    return work


def decoded(files: list[str]) -> np.ndarray:
    """Every image decoded as the training cache holds it (uint8), for the cached-epoch ceiling."""
    dataset = tf.data.Dataset.from_tensor_slices(files).map(
        lambda file: to_cached(decode_and_resize(tf.io.read_file(file), SIZE)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return np.stack(list(dataset.as_numpy_iterator()))


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


def variants(folder: Path, frame: pd.DataFrame, batch: int, cfg) -> dict[str, Callable[[], dict[str, float]]]:
    """Each variant as a function that measures it once and returns {figure: images per second}."""
    augment = augmentation(cfg.train.augment)
    if augment is None:
        raise SystemExit("train.augment turns every transform off: there is no augmentation to measure")
    names = [f"class_{i}" for i in range(CLASSES)]
    files = [str(folder / p) for p in frame["path"]]
    count, batches = len(files), -(-len(files) // batch)
    work = decode_augment(augment)

    cached_batch = tf.TensorSpec([None, SIZE, SIZE, 3], tf.uint8)

    @tf.function(input_signature=[cached_batch, tf.TensorSpec([2], tf.int64)])
    def augment_only(batch_images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        return augment(batch_images, seed)

    images = decoded(files)

    def seed(index: int) -> tf.Tensor:
        return tf.constant([0, index], tf.int64)

    def ceiling_decode(index: int) -> tf.Tensor:
        return work(tf.constant(files[index * batch : (index + 1) * batch]), seed(index))

    def ceiling_cached(index: int) -> tf.Tensor:
        return augment_only(tf.constant(images[index * batch : (index + 1) * batch]), seed(index))

    for index in {0, batches - 1}:  # trace and warm up (full and last batch) before any timing
        ceiling_decode(index)
        ceiling_cached(index)

    def ceilings() -> dict[str, float]:
        return {
            CEILING: threaded_rate(ceiling_decode, batches, count),
            CEILING_CACHED: threaded_rate(ceiling_cached, batches, count),
        }

    def training() -> dict[str, float]:
        dataset = image_dataset(frame, folder, names, SIZE, batch, shuffle_seed=0, augment=augment)
        return {EPOCH_1: rate(dataset, count), EPOCH_2: rate(dataset, count)}

    def legacy() -> dict[str, float]:
        flow, steps = image_data_generator(folder, batch, cfg.train.augment)
        start = time.perf_counter()
        for index in range(steps):
            flow[index]
        return {LEGACY: count / (time.perf_counter() - start)}

    return {"ceiling": ceilings, "training pipeline": training, "ImageDataGenerator": legacy}


def spread_table(figures: dict[str, list[float]]) -> str:
    """Median and range of each figure over the repeats."""
    lines = [
        f"{'images/s':<44}| {'median':>8} | {'min':>8} | {'max':>8}",
        f"{'-' * 44}+-{'-' * 8}-+-{'-' * 8}-+-{'-' * 8}",
    ]
    for name in (CEILING, EPOCH_1, CEILING_CACHED, EPOCH_2, LEGACY):
        values = figures[name]
        lines.append(
            f"{name:<44}| {statistics.median(values):8.1f} | {min(values):8.1f} | {max(values):8.1f}"
        )
    return "\n".join(lines)


def ratio_lines(median: dict[str, float]) -> list[str]:
    """The ratios the targets are about, from the medians."""
    return [
        f"training epoch 1 / ImageDataGenerator        : {median[EPOCH_1] / median[LEGACY]:6.2f}"
        "  (target >= 5)",
        f"training epoch 2 / ImageDataGenerator        : {median[EPOCH_2] / median[LEGACY]:6.2f}",
        f"training epoch 1 / ceiling (decode+augment)  : {median[EPOCH_1] / median[CEILING]:6.2f}"
        "  (target >= 0.80)",
        f"training epoch 2 / ceiling (augment decoded) : {median[EPOCH_2] / median[CEILING_CACHED]:6.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per variant, in rotating order")
    args = parser.parse_args()
    if args.repeats < 1 or args.images < 1 or args.batch < 1:
        parser.error("--images, --batch and --repeats must be at least 1")
    cfg = load_config(ROOT / "params.yaml", ROOT)
    print(header(["tensorflow", "keras", "numpy", "PIL", "scipy"]))
    with tempfile.TemporaryDirectory(prefix="bench-input-") as scratch:
        folder = Path(scratch)
        start = time.perf_counter()
        frame = write_images(folder, args.images)
        print(f"wrote {args.images} JPEGs of {SIZE}x{SIZE} in {time.perf_counter() - start:.1f} s")
        print(
            f"batch {args.batch}, repeats {args.repeats}, ceiling threads {os.cpu_count()}, "
            f"augmentation: {cfg.train.augment.model_dump()}\n"
        )
        measure = variants(folder, frame, args.batch, cfg)
        order = list(measure)
        figures: dict[str, list[float]] = {}
        for repeat in range(args.repeats):
            shift = repeat % len(order)
            for name in order[shift:] + order[:shift]:
                for figure, value in measure[name]().items():
                    figures.setdefault(figure, []).append(value)
                    print(f"repeat {repeat + 1}: {figure:<44} {value:8.1f} images/s", flush=True)

    median = {name: statistics.median(values) for name, values in figures.items()}
    print()
    print(spread_table(figures))
    print()
    print("\n".join(ratio_lines(median)))


if __name__ == "__main__":
    main()

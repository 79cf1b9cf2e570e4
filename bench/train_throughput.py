"""Training throughput of MobileNetV2 and EfficientNetB0 at 224x224: real input pipeline vs synthetic tensors.

For each model and each precision (float32, and mixed: bfloat16 on compute
capability 8.0+ or a CPU, float16 on 7.x), trains a few steps of `fit` on

- the real training input pipeline (`image_dataset` over JPEGs written by the
  benchmark, with the augmentation from params.yaml), and
- synthetic in-memory tensors of the same shape (no input cost at all),

and prints images/s and the ratio real/synthetic (target at least 0.9: the
input pipeline must keep the accelerator busy). Uses the strategy and policy
code of the train stage (`pipeline.train.distribute`). Runs on whatever
device TensorFlow sees; on a CPU the figures are CPU figures.

    python bench/train_throughput.py [--batch 32] [--steps 8] [--images 1024]
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

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.input_pipeline import CLASSES, SIZE, write_images  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.train import distribute  # noqa: E402
from pipeline.train.augment import augmentation  # noqa: E402
from pipeline.train.data import image_dataset  # noqa: E402
from pipeline.train.models import build_model  # noqa: E402


class StepTimer(keras.callbacks.Callback):
    """Wall time of the batches after the warm-up ones."""

    def __init__(self, warmup: int) -> None:
        super().__init__()
        self.warmup, self.start, self.timed = warmup, 0.0, 0

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if batch >= self.warmup:
            self.timed = batch - self.warmup + 1
            self.elapsed = time.perf_counter() - self.start


def images_per_second(model_name: str, precision: str, dataset, batch: int, steps: int, warmup: int) -> float:
    cfg = load_config(ROOT / "params.yaml", ROOT).train.model_copy(
        update={"model": model_name, "image_size": SIZE, "weights": "none"}
    )
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    model = build_model(cfg, CLASSES, ROOT, SIZE).model
    model.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy", jit_compile=cfg.jit_compile)
    timer = StepTimer(warmup)
    model.fit(dataset.take(warmup + steps), epochs=1, callbacks=[timer], verbose=0)
    keras.mixed_precision.set_global_policy("float32")
    return batch * timer.timed / timer.elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (tracing, caches)")
    parser.add_argument("--images", type=int, default=1024, help="JPEGs for the real pipeline")
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_b0"])
    args = parser.parse_args()
    cfg = load_config(ROOT / "params.yaml", ROOT)
    capability = distribute.gpu_compute_capability()
    mixed = distribute.precision_policy("on", capability)
    devices = [d.name for d in tf.config.list_logical_devices() if d.device_type in {"GPU", "CPU"}]
    print(f"devices: {devices}, GPU compute capability: {capability}, batch {args.batch}, steps {args.steps}")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        frame = write_images(Path(scratch), args.images)
        names = [f"class_{i}" for i in range(CLASSES)]
        real = image_dataset(
            frame,
            Path(scratch),
            names,
            SIZE,
            args.batch,
            shuffle_seed=0,
            augment=augmentation(cfg.train.augment),
        ).repeat()
        pixels = tf.random.uniform((args.batch, SIZE, SIZE, 3), 0, 255, seed=0)
        labels = tf.zeros((args.batch,), tf.int32)
        synthetic = tf.data.Dataset.from_tensors((pixels, labels)).repeat()
        print("\nmodel           | precision      | real img/s | synthetic img/s | real/synthetic")
        print("----------------+----------------+------------+-----------------+---------------")
        for model_name in args.models:
            for precision in ("float32", mixed):
                measured = {
                    kind: images_per_second(model_name, precision, data, args.batch, args.steps, args.warmup)
                    for kind, data in (("real", real), ("synthetic", synthetic))
                }
                print(
                    f"{model_name:15s} | {precision:14s} | {measured['real']:10.1f} | "
                    f"{measured['synthetic']:15.1f} | {measured['real'] / measured['synthetic']:13.2f}"
                )


if __name__ == "__main__":
    main()

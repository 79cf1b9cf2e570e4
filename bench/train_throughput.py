"""Training throughput of MobileNetV2 and EfficientNetB0 at 224x224: real input pipeline vs synthetic tensors.

For each model and each precision (float32, and mixed: bfloat16 on compute
capability 8.0+ or a CPU, float16 on 7.x), builds the model, traces its
training step on `--warmup` untimed steps, then trains with `fit` on

- synthetic in-memory tensors of the same shape (no input cost at all):
  `--steps` timed steps (default: as many as one real epoch);
- the real training input pipeline (`image_dataset` over `--images` JPEGs
  written by the benchmark, with the augmentation from params.yaml), built
  afresh for each model and precision so that its cache starts empty, for
  1 + `--cached-epochs` full epochs. Epoch 1 reads, decodes and augments every
  image and fills the in-memory cache; the later epochs read the decoded
  images from the cache and only augment them (what every epoch after the
  first costs in a real training run). The two are reported apart.

Prints images/s of epoch 1, of the cached epochs (median) and of the
synthetic steps, and the ratios real/synthetic (target at least 0.9: the
input pipeline must keep the accelerator busy). Uses the train stage's
precision policy (`pipeline.train.distribute.precision_policy`). Runs on whatever
device TensorFlow sees; on a CPU the figures are CPU figures. The JPEGs are
in the OS page cache (just written), so epoch 1 measures decode, not disk.

    python bench/train_throughput.py [--batch 32] [--images 1024] [--cached-epochs 2] [--warmup 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
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
from bench.provenance import header  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.train import distribute  # noqa: E402
from pipeline.train.augment import augmentation  # noqa: E402
from pipeline.train.data import image_dataset  # noqa: E402
from pipeline.train.models import build_model  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of each epoch of one `fit`, from its first step's input to its last step's end."""

    def __init__(self) -> None:
        super().__init__()
        self.start, self.seconds = 0.0, []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def synthetic_like(real: tf.data.Dataset, batch: int) -> tf.data.Dataset:
    """One random batch, repeated, with the real dataset's element spec: one trace of the step serves both."""
    pixels_spec, labels_spec = real.element_spec  # the augmentation leaves height and width unknown

    def loosen(pixels: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return (
            tf.compat.v1.placeholder_with_default(pixels, pixels_spec.shape),
            tf.compat.v1.placeholder_with_default(labels, labels_spec.shape),
        )

    pixels = tf.random.uniform((batch, SIZE, SIZE, 3), 0, 255, seed=0)
    labels = tf.zeros((batch,), labels_spec.dtype)
    return tf.data.Dataset.from_tensors((pixels, labels)).repeat().map(loosen)


def timed_epochs(model, dataset, epochs: int) -> list[float]:
    """Seconds of each epoch of `fit` over the dataset."""
    timer = EpochTimer()
    model.fit(dataset, epochs=epochs, callbacks=[timer], verbose=0)
    return timer.seconds


def measure(model_name: str, precision: str, real: tf.data.Dataset, synthetic: tf.data.Dataset, args) -> dict:
    """Images/s of the first real epoch, the cached real epochs (median) and the synthetic steps."""
    cfg = load_config(ROOT / "params.yaml", ROOT).train.model_copy(
        update={"model": model_name, "image_size": SIZE, "weights": "none"}
    )
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    try:
        model = build_model(cfg, CLASSES, ROOT, SIZE).model
        loss = "sparse_categorical_crossentropy"
        model.compile(keras.optimizers.Adam(1e-4), loss, jit_compile=cfg.jit_compile)
        model.fit(synthetic.take(args.warmup), epochs=1, verbose=0)  # trace; serves real too
        (synthetic_seconds,) = timed_epochs(model, synthetic.take(args.steps), 1)
        first, *cached = timed_epochs(model, real, 1 + args.cached_epochs)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return {
        "epoch 1": args.images / first,
        "cached": args.images / statistics.median(cached),
        "synthetic": args.batch * args.steps / synthetic_seconds,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--images", type=int, default=1024, help="JPEGs for the real pipeline (rounded up to whole batches)"
    )
    parser.add_argument("--cached-epochs", type=int, default=2, help="real epochs after the first (median)")
    parser.add_argument("--steps", type=int, default=None, help="timed synthetic steps (default: an epoch's)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed synthetic steps first (tracing)")
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_b0"])
    args = parser.parse_args()
    if min(args.batch, args.images, args.cached_epochs, args.warmup) < 1:
        parser.error("--batch, --images, --cached-epochs and --warmup must be at least 1")
    # Whole batches only, so every step of an epoch does the same work.
    args.images = -(-args.images // args.batch) * args.batch
    args.steps = args.steps or args.images // args.batch
    return args


def main() -> None:
    args = parse_args()
    cfg = load_config(ROOT / "params.yaml", ROOT)
    capability = distribute.gpu_compute_capability()
    mixed = distribute.precision_policy("on", capability)
    devices = [d.name for d in tf.config.list_logical_devices() if d.device_type in {"GPU", "CPU"}]
    print(header(["tensorflow", "keras"]))
    print(
        f"devices: {devices}, GPU compute capability: {capability}; batch {args.batch}, "
        f"real: {args.images} images = {args.images // args.batch} steps per epoch, 1 + "
        f"{args.cached_epochs} cached epochs; synthetic: {args.steps} steps after {args.warmup} warm-up"
    )
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        frame = write_images(Path(scratch), args.images)
        names = [f"class_{i}" for i in range(CLASSES)]
        print(
            "\nmodel           | precision      | epoch 1 img/s | cached img/s | synthetic img/s "
            "| epoch 1/synthetic | cached/synthetic"
        )
        print(
            "----------------+----------------+---------------+--------------+-----------------"
            "+-------------------+-----------------"
        )
        for model_name in args.models:
            for precision in ("float32", mixed):
                real = image_dataset(  # a new dataset: a new, empty cache
                    frame,
                    Path(scratch),
                    names,
                    SIZE,
                    args.batch,
                    shuffle_seed=0,
                    augment=augmentation(cfg.train.augment),
                )
                rates = measure(model_name, precision, real, synthetic_like(real, args.batch), args)
                print(
                    f"{model_name:15s} | {precision:14s} | {rates['epoch 1']:13.1f} | "
                    f"{rates['cached']:12.1f} | "
                    f"{rates['synthetic']:15.1f} | {rates['epoch 1'] / rates['synthetic']:17.2f} | "
                    f"{rates['cached'] / rates['synthetic']:16.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()

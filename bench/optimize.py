"""Benchmark of model optimization: every deployable form of two models, and distillation, in one run.

Trains its own models on scikit-learn's bundled digits (all 10 classes, 8x8
grey upscaled bilinearly to RGB, a seeded stratified 80/20 split); needs no
pipeline outputs and downloads nothing:

- (a) `small_cnn` at 32x32 on the whole split;
- (b) MobileNetV2 at 96x96 (`build_model`, random weights unless `--weights`
  names a `.weights.h5` of the base; the whole model is trained, see
  `mobilenet`) on a stratified subset (`--mobilenet-train`, `--mobilenet-test`).

For each it measures Keras (float32), TFLite float32, PTQ int8, QAT int8,
pruned + int8 and ONNX (onnxruntime), each made by the export stage's own
functions with its defaults (`ExportConfig`, `PruneConfig`): size and gzip
size in bytes, test accuracy, and latency p50: the median ms of one-image
calls (images in, float32 probabilities out, after one untimed call) over
the first `--latency-images` test images, at `--threads` threads for
TensorFlow's pools, LiteRT and onnxruntime alike; the median of `--repeats`
interleaved passes. Ratios are against TFLite float32 (size, latency) and
Keras (accuracy loss in points). Then distillation on the digits: the
small_cnn of (a) as teacher (width 32), a width-8 student trained with
`pipeline.train.distill.distiller` and the same student without, same
epochs and seed: accuracy, params, .keras size, latency.

Prints the tables, PASS/FAIL lines for the targets (int8 at most 0.3x the
TFLite float32 size and at most 1 point below Keras; ONNX latency at most
1.5x TFLite float32) and a final JSON line. Not a test: it asserts nothing.
A full run takes about 12 minutes on 2 CPU cores; `--quick` (a smoke run whose
figures mean nothing) about 4, under 1 with `--skip-mobilenet`.

    python bench/optimize.py [--quick] [--skip-mobilenet] [--threads 1] [--weights base.weights.h5]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.export import interleaved_latency, tflite_runner  # noqa: E402
from bench.provenance import provenance  # noqa: E402

if TYPE_CHECKING:
    from pipeline.config import ExportConfig, PruneConfig

LABELS = {
    "keras": "Keras float32",
    "float32": "TFLite float32",
    "ptq_int8": "PTQ int8",
    "qat_int8": "QAT int8",
    "pruned_int8": "pruned+int8",
    "onnx": "ONNX (onnxruntime)",
}
MAX_INT8_SIZE_RATIO, MAX_INT8_LOSS_POINTS, MAX_ONNX_LATENCY_RATIO = 0.3, 1.0, 1.5


@dataclass(frozen=True)
class Split:
    """Train and test images (float32 pixels 0..255, N x size x size x 3) and their labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


@dataclass(frozen=True)
class Tuning:
    """The export stage's QAT and pruning settings (its defaults, or tiny ones for --quick) and the seed."""

    export: ExportConfig
    prune: PruneConfig
    seed: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny sets and one epoch each: a smoke run, not figures")
    add("--skip-mobilenet", action="store_true", help="only the small CNN and distillation")
    add("--weights", default="none", help="MobileNetV2 base weights (.weights.h5); default: random")
    add("--threads", type=int, default=1, help="TF, LiteRT and onnxruntime threads (default: %(default)s)")
    add("--epochs", type=int, default=15, help="small_cnn training epochs (teacher and students)")
    add("--mobilenet-epochs", type=int, default=10, help="MobileNetV2 training epochs")
    add("--mobilenet-train", type=int, default=400, help="MobileNetV2 train images (stratified subset)")
    add("--mobilenet-test", type=int, default=200, help="MobileNetV2 test images (stratified subset)")
    add("--latency-images", type=int, default=100, help="one-image calls per latency pass")
    add("--repeats", type=int, default=3, help="interleaved latency passes; median")
    add("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.mobilenet_epochs, args.mobilenet_train, args.mobilenet_test = 1, 1, 40, 20
        args.latency_images, args.repeats = 10, 1
    return args


def digits(size: int, seed: int) -> Split:
    """scikit-learn's digits upscaled to size x size RGB, split 80/20 stratified by class."""
    import tensorflow as tf
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    grey = (data.images * (255.0 / 16.0)).astype(np.float32)[..., None]
    rgb = tf.image.grayscale_to_rgb(tf.image.resize(grey, (size, size), method="bilinear")).numpy()
    parts = train_test_split(rgb, data.target, test_size=0.2, stratify=data.target, random_state=seed)
    return Split(parts[0], parts[2], parts[1], parts[3])


def subset(split: Split, train: int, test: int, seed: int) -> Split:
    """A stratified subset of `train` train and `test` test images."""
    from sklearn.model_selection import train_test_split

    def take(images, labels, count):
        if count >= len(images):
            return images, labels
        kept = train_test_split(images, labels, train_size=count, stratify=labels, random_state=seed)
        return kept[0], kept[2]

    train_part = take(split.train_images, split.train_labels, train)
    return Split(*train_part, *take(split.test_images, split.test_labels, test))


def fit(model, split: Split, epochs: int, seed: int) -> float:
    """Adam at 1e-3, batch 32, on the train split; returns the wall seconds."""
    import keras

    keras.utils.set_random_seed(seed)
    model.compile(keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(split.train_images, split.train_labels, epochs=epochs, batch_size=32, verbose=0)
    return time.perf_counter() - start


def saved_keras(model, target: Path) -> Path:
    """The model as a .keras file without optimizer state (an uncompiled copy), as it would ship."""
    import keras

    copy = keras.Model.from_config(model.get_config())  # clone_model would compile it too
    copy.set_weights(model.get_weights())
    copy.save(target)
    return target


def mobilenet(weights: str, seed: int):
    """MobileNetV2 at 96x96 for the 10 digits (`build_model`), every layer trained, BatchNorm included.

    Under `fit`, Keras 3.15 runs the base's BatchNorm on batch statistics (the
    `training=False` of `transfer_model` does not hold while its layers are
    trainable), which random weights need to train at all; MobileNetV2's momentum
    of 0.999 would leave the moving averages near their initial values after a
    few hundred steps, so it is set to 0.9, as small_cnn has it.
    """
    import keras

    from pipeline.config import TrainConfig
    from pipeline.train.models import build_model

    keras.utils.set_random_seed(seed)
    config = TrainConfig(model="mobilenet_v2", image_size=96, weights=weights)
    built = build_model(config, 10, ROOT, 96)
    for layer in built.base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return built


def file_row(path: Path) -> dict:
    flat = path.read_bytes()
    return {"size_bytes": len(flat), "gzip_size_bytes": len(gzip.compress(flat, 9))}


def keras_row(model, split: Split, folder: Path) -> dict:
    """Size of the .keras file (no optimizer state) and test accuracy."""
    from pipeline.inference import predict

    target = saved_keras(model, folder / "model.keras")
    probabilities = predict(model, split.test_images)
    accuracy = float((probabilities.argmax(axis=1) == split.test_labels).mean())
    return {**file_row(target), "accuracy": accuracy, "probabilities": probabilities}


def tflite_rows(model, split: Split, keras_predicted, folder: Path, tuning: Tuning) -> dict[str, dict]:
    """float32, PTQ, QAT and pruned int8 TFLite files, made and scored by the export stage's functions."""
    from pipeline.compress import tfmot
    from pipeline.compress.tf_keras_copy import UnsupportedModel
    from pipeline.compress.variants import score_variant
    from pipeline.export import convert_tflite

    export, prune, seed = tuning.export, tuning.prune, tuning.seed
    rng = np.random.default_rng(0)
    count = min(export.calibration_images, len(split.train_images))
    calibration = split.train_images[rng.choice(len(split.train_images), count, replace=False)]
    data = tfmot.TrainingData(split.train_images, split.train_labels, calibration)
    converted = convert_tflite(model, calibration)
    makers = {
        "float32": lambda: converted["float32"],
        "ptq_int8": lambda: converted["int8"],
        "qat_int8": lambda: tfmot.quantization_aware(
            model, data, export.qat_epochs, export.qat_learning_rate, seed
        ),
        "pruned_int8": lambda: (
            tfmot.prune(
                model, data, prune.target_sparsity, prune.epochs, prune.min_steps, prune.batch_size, seed
            ).tflite
        ),
    }
    rows = {}
    for name, make in makers.items():
        start = time.perf_counter()
        try:
            flat = make()
        except (UnsupportedModel, ValueError, RuntimeError) as error:  # as pipeline.export handles them
            rows[name] = {"status": "failed", "error": str(error)[:300]}
            continue
        path = folder / f"{name}.tflite"
        path.write_bytes(flat)
        scored = score_variant(path, split.test_images, split.test_labels, keras_predicted)
        rows[name] = {**scored, "status": "ok", "path": path, "make_s": time.perf_counter() - start}
    return rows


def onnx_runner(path: Path, threads: int):
    """An onnxruntime session as a call at `threads` intra-op threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


def measure(model, split: Split, tuning: Tuning, args: argparse.Namespace) -> dict[str, dict]:
    """Every variant's row: sizes, accuracy, latency p50 and the ratios against TFLite float32 and Keras."""
    from pipeline.compress.onnx_export import export_onnx

    with tempfile.TemporaryDirectory(prefix="bench-optimize-") as name:
        folder = Path(name)
        reference = keras_row(model, split, folder)
        probabilities = reference.pop("probabilities")
        rows = {"keras": {**reference, "status": "ok"}}
        rows.update(tflite_rows(model, split, probabilities.argmax(axis=1), folder, tuning))
        onnx = export_onnx(model, folder / "model.onnx", split.test_images, split.test_labels, probabilities)
        rows["onnx"] = {**onnx, "status": onnx["status"], "path": folder / "model.onnx"}
        runners = {"keras": {1: model.predict_on_batch}}
        for variant, row in rows.items():
            if variant in ("keras", "onnx") or row["status"] != "ok":
                continue
            runners[variant] = {1: tflite_runner(row.pop("path"), 1, args.threads)}
        if onnx["status"] != "failed":
            runners["onnx"] = {1: onnx_runner(rows["onnx"].pop("path"), args.threads)}
        rows["onnx"].pop("path", None)
        passes = interleaved_latency(runners, split.test_images[: args.latency_images], args.repeats)
    for variant, timings in passes.items():
        rows[variant]["latency_ms_p50"] = statistics.median(timings[1])
    base = rows["float32"]
    for row in rows.values():
        if "accuracy" in row:
            row["accuracy_loss_points"] = 100.0 * (rows["keras"]["accuracy"] - row["accuracy"])
        if "size_bytes" in row and base["status"] == "ok":
            row["size_ratio"] = row["size_bytes"] / base["size_bytes"]
        if "latency_ms_p50" in row and "latency_ms_p50" in base:
            row["latency_ratio"] = row["latency_ms_p50"] / base["latency_ms_p50"]
    return rows


def targets(model_name: str, rows: dict[str, dict]) -> list[dict]:
    """The issue's targets, each with its measured value and whether it passed (a failed variant fails)."""
    checks = []
    for variant in ("ptq_int8", "qat_int8"):
        row = rows[variant]
        checks.append(
            (f"{LABELS[variant]} size / TFLite float32", row.get("size_ratio"), MAX_INT8_SIZE_RATIO)
        )
        loss = row.get("accuracy_loss_points")
        checks.append((f"{LABELS[variant]} accuracy loss vs Keras, points", loss, MAX_INT8_LOSS_POINTS))
    latency = rows["onnx"].get("latency_ratio")
    checks.append(("ONNX latency / TFLite float32 latency", latency, MAX_ONNX_LATENCY_RATIO))
    return [
        {
            "model": model_name,
            "target": text,
            "value": value,
            "at_most": limit,
            "passed": value is not None and value <= limit,
        }
        for text, value, limit in checks
    ]


def distill(teacher, split: Split, args: argparse.Namespace) -> dict[str, dict]:
    """The teacher, a distilled width-8 student and the same student trained alone, measured alike."""
    import keras

    from bench.export import ms_per_call
    from pipeline.config import DistillConfig, TrainConfig
    from pipeline.inference import predict
    from pipeline.train.distill import distiller
    from pipeline.train.models import small_cnn

    def student():
        keras.utils.set_random_seed(args.seed)  # both students start from the same weights
        return small_cnn(32, 10, TrainConfig().dropout, width=8)

    distilled, alone = student(), student()
    trainer = distiller(teacher, distilled, DistillConfig(teacher="unused", temperature=2.0, alpha=0.5))
    seconds = {"distilled student": fit(trainer, split, args.epochs, args.seed)}
    seconds["student alone"] = fit(alone, split, args.epochs, args.seed)
    models = {"teacher": teacher, "distilled student": distilled, "student alone": alone}
    rows = {}
    images = split.test_images[: args.latency_images]
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as folder:
        for name, model in models.items():
            target = saved_keras(model, Path(folder) / f"{name}.keras")
            predicted = predict(model, split.test_images).argmax(axis=1)
            latency = [ms_per_call(model.predict_on_batch, images, 1) for _ in range(args.repeats)]
            rows[name] = {
                "accuracy": float((predicted == split.test_labels).mean()),
                "params": model.count_params(),
                "keras_size_bytes": target.stat().st_size,
                "latency_ms_p50": statistics.median(latency),
                "train_s": seconds.get(name),
            }
    return rows


def variant_table(title: str, rows: dict[str, dict]) -> list[str]:
    def cell(row: dict, key: str, form: str, width: int) -> str:
        return f"{row[key]:>{width}{form}}" if row.get(key) is not None else f"{'-':>{width}}"

    lines = [
        title,
        f"{'variant':<18} | {'size bytes':>10} | {'gzip bytes':>10} | {'size/f32':>8} | {'accuracy':>8} | "
        f"{'loss pts':>8} | {'p50 ms':>7} | {'lat/f32':>7}",
        "-+-".join("-" * w for w in (18, 10, 10, 8, 8, 8, 7, 7)),
    ]
    for variant, row in rows.items():
        cells = [
            cell(row, "size_bytes", "d", 10),
            cell(row, "gzip_size_bytes", "d", 10),
            cell(row, "size_ratio", ".3f", 8),
            cell(row, "accuracy", ".4f", 8),
            cell(row, "accuracy_loss_points", ".2f", 8),
            cell(row, "latency_ms_p50", ".3f", 7),
            cell(row, "latency_ratio", ".3f", 7),
        ]
        status = (
            "" if row["status"] == "ok" else f"  ({row['status']}: {row.get('error') or row.get('errors')})"
        )
        lines.append(" | ".join([f"{LABELS[variant]:<18}", *cells]) + status)
    return lines


def distill_table(rows: dict[str, dict]) -> list[str]:
    lines = [
        "distillation (digits 32x32; teacher small_cnn width 32, students width 8, T=2, alpha=0.5)",
        f"{'model':<17} | {'accuracy':>8} | {'params':>7} | {'.keras bytes':>12} | {'p50 ms':>7} | "
        f"{'train s':>7}",
        "-+-".join("-" * w for w in (17, 8, 7, 12, 7, 7)),
    ]
    for name, row in rows.items():
        train = f"{row['train_s']:>7.1f}" if row["train_s"] is not None else f"{'(a)':>7}"
        lines.append(
            f"{name:<17} | {row['accuracy']:>8.4f} | {row['params']:>7d} | {row['keras_size_bytes']:>12d} | "
            f"{row['latency_ms_p50']:>7.3f} | {train}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)  # before TensorFlow runs any op
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras

    from pipeline.config import ExportConfig, PruneConfig, TrainConfig
    from pipeline.train.models import small_cnn

    tuning = Tuning(ExportConfig(), PruneConfig(), args.seed)
    if args.quick:
        tuning = Tuning(
            ExportConfig(calibration_images=16, qat_epochs=1), PruneConfig(epochs=1, min_steps=4), args.seed
        )

    info = provenance(
        ["tensorflow", "keras", "tensorflow_model_optimization", "ai_edge_litert", "onnxruntime"]
    )
    print("\n".join(f"{field}: {value}" for field, value in info.items()), flush=True)
    small = digits(32, args.seed)
    if args.quick:
        small = subset(small, 200, 60, args.seed)
    keras.utils.set_random_seed(args.seed)
    teacher = small_cnn(32, 10, TrainConfig().dropout, width=32)
    setups = {"small_cnn": {"image_size": 32, "train_s": fit(teacher, small, args.epochs, args.seed)}}
    results = {"small_cnn": measure(teacher, small, tuning, args)}
    setups["small_cnn"].update(train_images=len(small.train_images), test_images=len(small.test_images))
    if not args.skip_mobilenet:
        mobile = subset(digits(96, args.seed), args.mobilenet_train, args.mobilenet_test, args.seed)
        built = mobilenet(args.weights, args.seed)
        seconds = fit(built.model, mobile, args.mobilenet_epochs, args.seed)
        setups["mobilenet_v2"] = {
            "image_size": 96,
            "weights": built.weights_source if args.weights != "none" else "random (none)",
            "train_s": seconds,
            "train_images": len(mobile.train_images),
            "test_images": len(mobile.test_images),
        }
        results["mobilenet_v2"] = measure(built.model, mobile, tuning, args)
    distilled = distill(teacher, small, args)

    lines = [
        f"threads: {args.threads} (TensorFlow intra/inter-op, LiteRT num_threads, onnxruntime intra-op); "
        f"latency: batch 1, median ms per call over {args.latency_images} test images, "
        f"median of {args.repeats} interleaved passes",
        "size/f32, lat/f32: against TFLite float32; loss pts: Keras accuracy minus the variant's, x100",
    ]
    for name, rows in results.items():
        setup = setups[name]
        title = (
            f"{name} {setup['image_size']}x{setup['image_size']}: {setup['train_images']} train / "
            f"{setup['test_images']} test images, trained {setup['train_s']:.0f} s"
            + (f", weights {setup['weights']}" if "weights" in setup else "")
        )
        lines += ["", *variant_table(title, rows)]
    lines += ["", *distill_table(distilled), ""]
    checks = [check for name, rows in results.items() for check in targets(name, rows)]
    for check in checks:
        value = "n/a" if check["value"] is None else f"{check['value']:.3f}"
        verdict = "PASS" if check["passed"] else "FAIL"
        lines.append(
            f"{verdict} {check['model']}: {check['target']} = {value} (target <= {check['at_most']})"
        )
    print("\n".join(lines))
    summary = {
        "provenance": info,
        "setup": setups,
        "variants": results,
        "distillation": distilled,
        "targets": checks,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

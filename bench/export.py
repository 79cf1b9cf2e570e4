"""Benchmark of the export: Keras against the four TFLite variants, measured in one run.

Loads the trained Keras model, converts float32, float16, dynamic-range and int8
TFLite models freshly in memory (int8 calibrated on the same train images as the
export stage), and measures size, test accuracy and agreement with Keras for each,
and the latency of every variant, Keras included, under the same conditions:

- the same batch sizes (`--batch-sizes`, default 1 and 32): one call classifies
  one batch of test images; the figure is the median ms per call over the test
  split's full batches, divided by the batch size (ms per image);
- the same thread count (`--threads`, default the machine's cores): TensorFlow's
  intra-op and inter-op thread pools and the LiteRT interpreter's `num_threads`;
- the same span: a call is images in, float32 probabilities out
  (`predict_on_batch` for Keras; quantize the input if needed, `set_tensor`,
  `invoke`, `get_tensor` and dequantize for LiteRT), after one untimed call;
- `--repeats` passes, the variants' order rotating each pass; the median of
  the passes is reported.

(The export stage's own latency in reports/export.json is batch 1, `invoke`
only, LiteRT's default threads: not the same figure.) Prints the table and the
ratios int8/float32 (and a few others), all computed from numbers of this run.

Not a test: it asserts nothing. Needs a trained model (`make run` or `dvc repro export`).

    python bench/export.py [--repeats 3] [--threads N] [--batch-sizes 1 32] [--json bench-export.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.provenance import provenance  # noqa: E402

Predict = Callable[..., object]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="project root (default: %(default)s)")
    parser.add_argument("--params", type=Path, default=None, help="params file (default: <root>/params.yaml)")
    parser.add_argument("--repeats", type=int, default=3, help="latency passes over the test split; median")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="TF and LiteRT threads (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 32], help="images per call (default: 1 32)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if min(args.repeats, args.threads, *args.batch_sizes) < 1:
        parser.error("--repeats, --threads and --batch-sizes must be at least 1")
    args.root = args.root.resolve()
    if args.params is None:
        args.params = args.root / "params.yaml"
    return args


def tflite_runner(path: Path, batch: int, threads: int) -> Predict:
    """A LiteRT interpreter as a call: `batch` float32 images in, float32 probabilities out."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    source = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(source["index"], [batch, *source["shape"][1:]])
    interpreter.allocate_tensors()
    target = interpreter.get_output_details()[0]

    def predict(images: np.ndarray) -> np.ndarray:
        if source["dtype"] != np.float32:  # as pipeline.export.tflite_predict quantizes
            scale, zero_point = source["quantization"]
            info = np.iinfo(source["dtype"])
            images = np.clip(np.round(images / scale + zero_point), info.min, info.max)
        interpreter.set_tensor(source["index"], images.astype(source["dtype"]))
        interpreter.invoke()
        output = interpreter.get_tensor(target["index"]).astype(np.float32)
        if target["dtype"] != np.float32:
            scale, zero_point = target["quantization"]
            output = (output - zero_point) * scale
        return output

    return predict


def ms_per_call(predict: Predict, images, batch: int) -> float:
    """Median ms of one call over the full batches of `images`, after one untimed call."""
    batches = [images[start : start + batch] for start in range(0, len(images) - batch + 1, batch)]
    predict(batches[0])
    timings = []
    for inputs in batches:
        start = time.perf_counter()
        predict(inputs)
        timings.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(timings)


def predicted_classes(predict: Predict, images):
    """The class each image gets, one image per call."""
    import numpy as np

    return np.array([int(np.argmax(predict(images[i : i + 1]))) for i in range(len(images))])


def interleaved_latency(
    runners: dict[str, dict[int, Predict]], images, repeats: int
) -> dict[str, dict[int, list[float]]]:
    """ms per call of each variant and batch size, per pass; each pass starts one variant later."""
    names = list(runners)
    timings: dict[str, dict[int, list[float]]] = {name: {b: [] for b in runners[name]} for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            for batch, predict in runners[name].items():
                timings[name][batch].append(ms_per_call(predict, images, batch))
    return timings


def ratios(rows: dict[str, dict], batch_sizes: list[int]) -> dict[str, float]:
    """The ratios the benchmark exists for, from this run's rows."""

    def size(name: str) -> float:
        return rows[name]["size_bytes"]

    found = {
        "int8/float32 size": size("int8") / size("float32"),
        "float16/float32 size": size("float16") / size("float32"),
        "dynamic_range/float32 size": size("dynamic_range") / size("float32"),
    }
    for b in batch_sizes:
        latency = {name: row["latency_ms_per_image"][b] for name, row in rows.items()}
        found[f"int8/float32 latency, batch {b}"] = latency["int8"] / latency["float32"]
        found[f"keras/int8 latency, batch {b}"] = latency["keras"] / latency["int8"]
        found[f"keras/float32 latency, batch {b}"] = latency["keras"] / latency["float32"]
    return found


def format_report(info: dict, setup: dict, rows: dict[str, dict], ratio: dict[str, float]) -> str:
    threads, batch_sizes = setup["threads"], setup["batch_sizes"]
    columns = [f"ms/img b={b} t={threads}" for b in batch_sizes]
    lines = [
        *(f"{field}: {value}" for field, value in info.items()),
        f"model: {setup['model']} ({setup['image_size']}x{setup['image_size']}), "
        f"test images: {setup['test_images']}, calibration images: {setup['calibration_images']}",
        f"latency: median ms per image (b images per call, t = {threads} threads for TensorFlow's "
        f"intra- and inter-op pools and LiteRT's num_threads), median of {setup['repeats']} "
        "interleaved passes over the test split",
        "",
        " | ".join(
            [f"{'variant':<14}", f"{'size KiB':>9}", f"{'accuracy':>8}", f"{'agreement':>9}", *columns]
        ),
        "-+-".join(["-" * 14, "-" * 9, "-" * 8, "-" * 9, *("-" * len(c) for c in columns)]),
    ]
    for name, row in rows.items():
        cells = [
            f"{name:<14}",
            f"{row['size_bytes'] / 1024:>9.1f}",
            f"{row['accuracy']:>8.4f}",
            f"{row['agreement_with_keras']:>9.4f}",
        ]
        cells += [
            f"{row['latency_ms_per_image'][b]:>{len(c)}.3f}"
            for b, c in zip(batch_sizes, columns, strict=True)
        ]
        lines.append(" | ".join(cells))
    lines.append("")
    width = max(len(name) for name in ratio)
    lines.extend(f"{name:<{width}} : {value:.3f}" for name, value in ratio.items())
    return "\n".join(lines)


def measure_rows(
    model, keras_size: int, images, labels, calibration, predict_batch: int, args
) -> dict[str, dict]:
    """Size, accuracy, agreement with Keras and latency of Keras and of each fresh TFLite conversion."""
    from pipeline.export import convert_tflite

    keras_predicted = model.predict(images, batch_size=predict_batch, verbose=0).argmax(axis=1)
    rows: dict[str, dict] = {
        "keras": {
            "size_bytes": keras_size,
            "accuracy": float((keras_predicted == labels).mean()),
            "agreement_with_keras": 1.0,
        }
    }
    runners: dict[str, dict[int, Predict]] = {"keras": {b: model.predict_on_batch for b in args.batch_sizes}}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as folder:
        for variant, flat in convert_tflite(model, calibration).items():
            target = Path(folder) / f"model_{variant}.tflite"
            target.write_bytes(flat)
            runners[variant] = {b: tflite_runner(target, b, args.threads) for b in args.batch_sizes}
            predicted = predicted_classes(tflite_runner(target, 1, args.threads), images)
            rows[variant] = {
                "size_bytes": target.stat().st_size,
                "accuracy": float((predicted == labels).mean()),
                "agreement_with_keras": float((predicted == keras_predicted).mean()),
            }
        timings = interleaved_latency(runners, images, args.repeats)
    for name, row in rows.items():
        row["latency_ms_per_call_per_repeat"] = timings[name]
        row["latency_ms_per_call"] = {b: statistics.median(t) for b, t in timings[name].items()}
        row["latency_ms_per_image"] = {b: ms / b for b, ms in row["latency_ms_per_call"].items()}

    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.paths import StagePaths

    try:
        cfg = load_config(args.params, args.root)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    paths = StagePaths.from_config(cfg.paths, args.root)
    if not paths.keras_model.is_file():
        print(
            f"error: no trained model at {paths.keras_model}\n"
            "run `make run` (or `dvc repro export`) in the project root first; the benchmark does not train",
            file=sys.stderr,
        )
        return 1
    for split in ("train", "test"):
        if not paths.split_file(split).is_file():
            print(f"error: {paths.split_file(split)} is missing; run `make run` first", file=sys.stderr)
            return 1

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)  # before TensorFlow runs any op
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    import numpy as np

    from pipeline.artifacts import image_files, input_size, load_trained_model, read_split
    from pipeline.images import load_files

    info = provenance(["tensorflow", "keras", "ai_edge_litert"])
    model, names = load_trained_model(paths)
    size = input_size(model)  # what train.image_size (auto) decided
    test, train = read_split(paths, "test"), read_split(paths, "train")
    if len(test) < max(args.batch_sizes):
        print(
            f"error: {len(test)} test images, fewer than a batch of {max(args.batch_sizes)}", file=sys.stderr
        )
        return 1
    images = load_files(image_files(test, paths.root), size)
    labels = np.array([names.index(label) for label in test["label"]])
    calibration_rows = train.sample(min(cfg.export.calibration_images, len(train)), random_state=0)
    calibration = load_files(image_files(calibration_rows, paths.root), size)  # as pipeline.export.run

    keras_size = paths.keras_model.stat().st_size
    rows = measure_rows(model, keras_size, images, labels, calibration, cfg.train.batch_size, args)

    setup = {
        "model": cfg.train.model,
        "image_size": size,
        "test_images": len(images),
        "calibration_images": len(calibration),
        "repeats": args.repeats,
        "threads": args.threads,
        "batch_sizes": args.batch_sizes,
    }
    ratio = ratios(rows, args.batch_sizes)
    print(format_report(info, setup, rows, ratio))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"provenance": info, "setup": setup, "rows": rows, "ratios": ratio}, indent=2) + "\n",
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

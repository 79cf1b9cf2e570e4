"""Benchmark of the export: Keras against the four TFLite variants, measured in one run.

Loads the trained Keras model, converts float32, float16, dynamic-range and int8
TFLite models freshly in memory (int8 calibrated on the same train images as the
export stage), and measures size, test accuracy, median per-image latency (batch
of 1) and agreement with Keras for each. Prints the table and the ratios
int8/float32 (and a few others), all computed from numbers of this run.

Not a test: it asserts nothing. Needs a trained model (`make run` or `dvc repro export`).

    python bench/export.py [--repeats 3] [--json bench-export.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="project root (default: %(default)s)")
    parser.add_argument("--params", type=Path, default=None, help="params file (default: <root>/params.yaml)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="latency passes over the test split; median of medians"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.root = args.root.resolve()
    if args.params is None:
        args.params = args.root / "params.yaml"
    return args


def machine() -> dict[str, str | int | None]:
    """What the figures were measured on."""
    from importlib.metadata import PackageNotFoundError, version

    import tensorflow as tf

    try:
        litert = version("ai-edge-litert")
    except PackageNotFoundError:
        litert = "not installed"
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "ai_edge_litert": litert,
    }


def keras_latency_ms(model, images, repeats: int) -> float:
    """Median over `repeats` passes of the median ms per image (batch of 1) with the Keras model."""
    from pipeline.evaluate import latency_ms

    return statistics.median(latency_ms(model, images, len(images)) for _ in range(repeats))


def measure_variant(path: Path, images, labels, keras_predicted, repeats: int) -> dict:
    """Size, accuracy, agreement and median-of-medians latency of one TFLite file."""
    import numpy as np

    from pipeline.export import tflite_predict

    probabilities, first = tflite_predict(path, images)
    latencies = [first]
    for _ in range(repeats - 1):
        again, latency = tflite_predict(path, images)
        if not np.array_equal(again.argmax(axis=1), probabilities.argmax(axis=1)):
            print(f"warning: {path.name}: predictions differ between repeats", file=sys.stderr)
        latencies.append(latency)
    predicted = probabilities.argmax(axis=1)
    return {
        "size_bytes": path.stat().st_size,
        "accuracy": float((predicted == labels).mean()),
        "latency_ms_median": statistics.median(latencies),
        "latency_ms_per_repeat": latencies,
        "agreement_with_keras": float((predicted == keras_predicted).mean()),
    }


def ratios(rows: dict[str, dict]) -> dict[str, float]:
    """The ratios the benchmark exists for, from this run's rows."""

    def size(name: str) -> float:
        return rows[name]["size_bytes"]

    def latency(name: str) -> float:
        return rows[name]["latency_ms_median"]

    return {
        "int8/float32 size": size("int8") / size("float32"),
        "int8/float32 latency": latency("int8") / latency("float32"),
        "float16/float32 size": size("float16") / size("float32"),
        "dynamic_range/float32 size": size("dynamic_range") / size("float32"),
        "keras latency / int8 latency": latency("keras") / latency("int8"),
    }


def format_report(info: dict, setup: dict, rows: dict[str, dict], ratio: dict[str, float]) -> str:
    lines = [
        f"machine: {info['processor']}, {info['cpu_count']} CPUs ({info['platform']})",
        f"python {info['python']}, tensorflow {info['tensorflow']}, ai_edge_litert {info['ai_edge_litert']}",
        f"model: {setup['model']} ({setup['image_size']}x{setup['image_size']}), "
        f"test images: {setup['test_images']}, calibration images: {setup['calibration_images']}, "
        f"repeats: {setup['repeats']}",
        "",
        f"{'variant':<14} | {'size KiB':>9} | {'accuracy':>8} | {'median latency ms':>17} | "
        f"{'agreement with Keras':>20}",
        f"{'-' * 14}-+-{'-' * 9}-+-{'-' * 8}-+-{'-' * 17}-+-{'-' * 20}",
    ]
    for name, row in rows.items():
        lines.append(
            f"{name:<14} | {row['size_bytes'] / 1024:>9.1f} | {row['accuracy']:>8.4f} | "
            f"{row['latency_ms_median']:>17.3f} | {row['agreement_with_keras']:>20.4f}"
        )
    lines.append("")
    width = max(len(name) for name in ratio)
    lines.extend(f"{name:<{width}} : {value:.3f}" for name, value in ratio.items())
    return "\n".join(lines)


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

    import numpy as np

    from pipeline.artifacts import image_files, input_size, load_trained_model, read_split
    from pipeline.export import convert_tflite
    from pipeline.images import load_files

    info = machine()
    model, names = load_trained_model(paths)
    size = input_size(model)  # what train.image_size (auto) decided
    test, train = read_split(paths, "test"), read_split(paths, "train")
    if test.empty:
        print(f"error: {paths.split_file('test')} has no rows", file=sys.stderr)
        return 1
    images = load_files(image_files(test, paths.root), size)
    labels = np.array([names.index(label) for label in test["label"]])
    keras_predicted = model.predict(images, batch_size=cfg.train.batch_size, verbose=0).argmax(axis=1)
    calibration_rows = train.sample(min(cfg.export.calibration_images, len(train)), random_state=0)
    calibration = load_files(image_files(calibration_rows, paths.root), size)  # as pipeline.export.run

    rows: dict[str, dict] = {
        "keras": {
            "size_bytes": paths.keras_model.stat().st_size,
            "accuracy": float((keras_predicted == labels).mean()),
            "latency_ms_median": keras_latency_ms(model, images, args.repeats),
            "agreement_with_keras": 1.0,
        }
    }
    with tempfile.TemporaryDirectory(prefix="bench-export-") as folder:
        for variant, flat in convert_tflite(model, calibration).items():
            target = Path(folder) / f"model_{variant}.tflite"
            target.write_bytes(flat)
            rows[variant] = measure_variant(target, images, labels, keras_predicted, args.repeats)

    setup = {
        "model": cfg.train.model,
        "image_size": size,
        "test_images": len(images),
        "calibration_images": len(calibration),
        "repeats": args.repeats,
    }
    ratio = ratios(rows)
    print(format_report(info, setup, rows, ratio))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"machine": info, "setup": setup, "rows": rows, "ratios": ratio}, indent=2) + "\n",
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of one drift check: a 2,000-image reference against batches of 250 to 4,000 images.

Times what the drift-check flow does for each batch (`pipeline.monitoring.check.check_batch`:
decode, image statistics, embedding and softmax extraction with the model,
every detector; then the JSON and HTML reports), with the project's trained
model and the detector settings from params.yaml. Reference and batches are
drawn with replacement from the ingested images (`data/raw`), so the batch
images are real files the check has to read and decode.

Prints seconds per check for each batch size, the split between profiling
(I/O and the model) and the detectors, and the growth relative to the
1,000-image batch. Target: the 1,000-image check under 10 s on 2 CPU cores.

Not a test: it asserts nothing. Needs a trained model (`make run`).

    python bench/drift.py [--reference 2000] [--sizes 250 500 1000 2000 4000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from pipeline.artifacts import input_size, load_trained_model  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.monitoring import check as monitor  # noqa: E402
from pipeline.monitoring import report as drift_report  # noqa: E402
from pipeline.monitoring.landing import read_batch  # noqa: E402
from pipeline.monitoring.profile import build_reference  # noqa: E402
from pipeline.monitoring.shifts import unchanged, write_batch  # noqa: E402
from pipeline.paths import StagePaths  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=int, default=2000, help="reference images")
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000])
    parser.add_argument("--repeats", type=int, default=3, help="checks per size (median reported)")
    args = parser.parse_args()

    cfg = load_config(ROOT / "params.yaml", ROOT)
    paths = StagePaths.from_config(cfg.paths, ROOT)
    if not paths.keras_model.is_file():
        raise SystemExit(f"{paths.keras_model} not found: run `make run` first")
    model, class_names = load_trained_model(paths)
    pixels = input_size(model)  # what train.image_size (auto) decided
    pool = sorted(paths.raw.rglob("*.png"))
    rng = np.random.default_rng(0)
    chosen = [pool[i] for i in rng.choice(len(pool), args.reference, replace=True)]
    start = time.perf_counter()
    reference = build_reference(
        chosen,
        [p.parent.name for p in chosen],
        model,
        class_names,
        pixels,
        cfg.drift.embeddings.dim,
        1.0,
    )
    build_seconds = time.perf_counter() - start

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({platform.platform()})")
    print(
        f"model: {cfg.train.model} ({pixels}x{pixels}), reference: "
        f"{args.reference} images (built in {build_seconds:.1f} s), MMD permutations: "
        f"{cfg.drift.embeddings.permutations}, max_reference: {cfg.drift.embeddings.max_reference}, "
        f"repeats: {args.repeats}\n"
    )
    print("batch images | check s (median) | profile s | detectors s | reports s | s per 1k images")
    print("-------------+------------------+-----------+-------------+-----------+----------------")
    results: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as scratch:
        for size in args.sizes:
            files = [pool[i] for i in rng.choice(len(pool), size, replace=True)]
            batch_dir = write_batch(
                files, [p.parent.name for p in files], Path(scratch) / f"b{size}", unchanged(), 0
            )
            batch = read_batch(batch_dir)
            totals, profiles, detectors, reports = [], [], [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                keep, labels, _ = monitor.decodable_files(batch, cfg.ingest.max_pixels)
                profile = monitor.profile_files(
                    keep, labels, model, class_names, pixels, reference.projection
                )
                t1 = time.perf_counter()
                found = monitor.detect(reference, profile, cfg.drift)
                t2 = time.perf_counter()
                report = monitor.DriftReport(
                    batch.name,
                    "",
                    "bench",
                    True,
                    len(keep),
                    cfg.drift.alpha,
                    any(d.drift for d in found),
                    found,
                )
                drift_report.write_reports(report, reference, profile, Path(scratch) / "reports")
                t3 = time.perf_counter()
                totals.append(t3 - t0)
                profiles.append(t1 - t0)
                detectors.append(t2 - t1)
                reports.append(t3 - t2)
            results[size] = statistics.median(totals)
            print(
                f"{size:12d} | {results[size]:16.2f} | {statistics.median(profiles):9.2f} | "
                f"{statistics.median(detectors):11.2f} | {statistics.median(reports):9.2f} | "
                f"{1000 * results[size] / size:14.2f}"
            )
    if 1000 in results:
        print()
        for size, seconds in results.items():
            print(
                f"time({size}) / time(1000) = {seconds / results[1000]:.2f}   (size ratio {size / 1000:.2f})"
            )
        verdict = "met" if results[1000] < 10 else "NOT met"
        print(f"\ntarget: one check of 1,000 images against {args.reference} under 10 s -> {verdict}")


if __name__ == "__main__":
    main()

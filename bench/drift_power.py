"""Per-detector alarm rates of the drift check: detector x shift x batch size, on synthetic shapes.

A small CNN learns three shapes; its reference and test accuracy come from
held-out sets; every batch is cut from pools of images it never saw, profiled
once (tests/drift_power.py, shared with tests/model/test_detector_power.py).
Each check is `pipeline.monitoring.check.detect` with the detector settings of
params.yaml, so each detector tests at the share of `drift.alpha` it gets in
a real check (with the equal weights of params.yaml: 1/6 of it in a labelled
batch, 1/4 in an unlabelled one).

For each batch size: the alarm rate of every detector (and of any detector,
the check's verdict) on clean batches (the false-alarm rate, with the bound
tests/model/test_detector_power.py holds it to) and under each shift (power),
for labelled and unlabelled batches. Within one row no image is in two
batches; labelled and unlabelled rows draw from the same pools independently.

Not a test: it asserts nothing. Needs no trained project.

    python bench/drift_power.py [--sizes 25 50 100] [--clean-checks 200] [--shift-checks 50]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.provenance import header  # noqa: E402
from pipeline.config import DriftConfig, load_config  # noqa: E402
from pipeline.monitoring.check import DETECTORS  # noqa: E402
from tests.drift_power import (  # noqa: E402
    CLASSES,
    IMAGE_SIZE,
    IMPERFECT,
    SHIFTS,
    AlarmRate,
    Pools,
    alarm_rates,
    batches,
    build_pools,
    disjoint,
    imperfect_champion,
    take,
)

NAMES = [*DETECTORS, "any"]
IMPERFECT_KIND = f"labelled, {IMPERFECT:.0%} wrong"  # tests/drift_power.imperfect_champion


def row(size: int, shift: str, kind: str, rates: dict[str, AlarmRate]) -> str:
    """One table row: each detector's alarm rate ('-' where it does not run on such batches)."""
    cells = [f"{rates[n].rate:.3f}" if n in rates else "-" for n in NAMES]
    checks = next(iter(rates.values())).checks
    return f"| {size} | {shift} | {kind} | {checks} | " + " | ".join(cells) + " |"


def table(pools: Pools, cfg: DriftConfig, sizes: list[int], clean_checks: int, shift_checks: int, seed: int):
    """Print one row per batch size, shift and kind of batch; returns the clean rows by (size, kind)."""
    print("| batch | shift | labels | checks | " + " | ".join(NAMES) + " |")
    print("|---|---|---|---|" + "---|" * len(NAMES))
    clean: dict[tuple[int, str], dict[str, AlarmRate]] = {}
    imperfect, wrong_labels = imperfect_champion(pools, IMPERFECT, seed)
    for size in sizes:
        for number, shift in enumerate(SHIFTS):
            count = clean_checks if shift == "clean" else shift_checks
            for labelled in (True, False):
                if shift == "label_noise" and not labelled:
                    continue  # wrong labels in a batch without labels: nothing to see
                drawn = batches(
                    pools, shift, size, count, labelled, seed + 1000 * size + 10 * number + labelled
                )
                rates = alarm_rates(pools.reference, drawn, cfg)
                kind = "labelled" if labelled else "unlabelled"
                if shift == "clean":
                    clean[size, kind] = rates
                print(row(size, shift, kind, rates), flush=True)
        index = disjoint(len(wrong_labels.predicted), size, clean_checks, np.random.default_rng(seed + size))
        rates = alarm_rates(imperfect, [take(wrong_labels, i) for i in index], cfg)
        clean[size, IMPERFECT_KIND] = rates
        print(row(size, "clean", IMPERFECT_KIND, rates), flush=True)
    return clean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100], help="images per batch")
    parser.add_argument("--clean-checks", type=int, default=200, help="clean batches per row")
    parser.add_argument("--shift-checks", type=int, default=50, help="shifted batches per row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg = load_config(ROOT / "params.yaml", ROOT).drift
    largest = max(args.sizes)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-drift-power-") as scratch:
        pools = build_pools(
            Path(scratch),
            clean=args.clean_checks * largest,
            shift_batches=(largest, args.shift_checks),
            dim=cfg.embeddings.dim,
            seed=args.seed,
        )
    built = time.perf_counter() - started
    reference = pools.reference
    print(header(["tensorflow", "keras", "numpy", "scipy"]))
    print(
        f"champion: small_cnn width 16 ({IMAGE_SIZE}x{IMAGE_SIZE}) on {', '.join(CLASSES)}; test accuracy "
        f"{reference.test_accuracy:.3f} on {reference.test_images} images; reference "
        f"{len(reference.profile.predicted)} images; pools: {len(pools.clean.predicted)} clean images, "
        f"{args.shift_checks * largest} per shift; built and profiled in {built:.0f} s"
    )
    print(
        f"drift: alpha {cfg.alpha}, MMD permutations {cfg.embeddings.permutations}, "
        f"accuracy min_drop {cfg.accuracy.min_drop}, weights "
        + ", ".join(f"{n} {getattr(cfg, n).weight:g}" for n in DETECTORS)
    )
    imperfect = imperfect_champion(pools, IMPERFECT, args.seed)[0].test_accuracy
    print(
        f"{IMPERFECT_KIND}: {IMPERFECT:.0%} of the labels wrong in the reference images and the clean pool "
        f"alike (a champion at {imperfect:.3f} on {len(reference.profile.predicted)} test images)"
    )
    print("shifts:\n" + "\n".join(f"  {name}: {what}" for name, what in SHIFTS.items()) + "\n")
    clean = table(pools, cfg, args.sizes, args.clean_checks, args.shift_checks, args.seed)
    print("\nlevel of each detector (its share of alpha) and false-alarm bound over the clean checks:")
    for kind in ("labelled", "unlabelled"):
        rates = clean[args.sizes[0], kind]
        print(f"  {kind}: " + ", ".join(f"{n} {r.alpha:.4f} (bound {r.bound:.4f})" for n, r in rates.items()))
    for (size, kind), rates in clean.items():
        over = [f"{n} {r.rate:.3f} > {r.bound:.3f}" for n, r in rates.items() if r.rate > r.bound]
        print(f"  batch {size}, {kind}: " + ("; ".join(over) or "every detector within its bound"))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

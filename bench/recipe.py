"""The training recipe on data it was not tuned on: the old epoch-counted recipe against the new one.

For each dataset of tests/model/test_own_images.py (digits subsets of 20 and
50 per class, three synthetic tasks) and for the full embedded digits, runs
ingest -> validate -> split -> baseline -> train -> evaluate twice on the same
images: with the code and params.yaml of the commit before the step-counted
recipe (`--old`, checked out into a temporary git worktree) and with the
working tree's. Prints HOG+SVM accuracy, both CNN accuracies, training
seconds and optimizer steps, and the ratios the targets are about:

- the new CNN at least matches HOG on every dataset;
- the full digits train no more than 1.5x slower than with the old recipe.

    python bench/recipe.py [--old <commit>] [--only shapes,digits]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.datasets import DATASETS, write_dataset  # noqa: E402

OLD_RECIPE = "1b1dc7d"  # main before the step-counted recipe: batch 64, 32 px, epochs with plateau patience

# Runs inside a checkout (old or new) with that checkout's own pipeline package and params.yaml.
WORKER = r"""
import json, math, sys, time
from pathlib import Path
import pandas as pd, yaml
from pipeline.config import parse_config
from pipeline.paths import StagePaths
from pipeline.stages import stage
from pipeline.logs import configure_logging
configure_logging()
repo, source, root = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
raw = yaml.safe_load((repo / "params.yaml").read_text())
if source != "embedded":
    raw["ingest"].update({"source": "folder", "folder": {"path": source}})
cfg = parse_config(raw)
paths = StagePaths.from_config(cfg.paths, root)
seconds = 0.0
for name in ("ingest", "validate", "split", "baseline", "train", "evaluate"):
    started = time.perf_counter()
    stage(name).entry()(cfg, paths)
    if name == "train":
        seconds = time.perf_counter() - started
history = pd.read_csv(paths.reports / "train_history.csv")
report = paths.reports / "train.json"
if report.is_file():
    steps = json.loads(report.read_text())["steps_run"]
else:  # the old recipe: one pass per epoch at batch_size
    steps = len(history) * math.ceil(len(pd.read_csv(paths.splits / "train.csv")) / cfg.train.batch_size)
print("BENCH " + json.dumps({
    "hog": json.loads((paths.reports / "baseline.json").read_text())["accuracy"],
    "cnn": json.loads((paths.reports / "metrics.json").read_text())["accuracy"],
    "seconds": seconds, "steps": int(steps), "epochs": len(history),
}))
"""


def run(checkout: Path, source: str, workdir: Path) -> dict:
    workdir.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(checkout), "GX_ANALYTICS_ENABLED": "False"}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(checkout), source, str(workdir)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode or not lines:
        raise SystemExit(f"{checkout} on {source} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(lines[-1].removeprefix("BENCH ")))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--old", default=OLD_RECIPE, help="commit of the epoch-counted recipe")
    parser.add_argument("--only", default="", help="comma-separated datasets (default: all and digits)")
    args = parser.parse_args()
    names = [*DATASETS, "digits"] if not args.only else args.only.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as tmp:
        scratch = Path(tmp)
        old = scratch / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.old], cwd=ROOT, check=True)
        try:
            rows = []
            for name in names:
                source = (
                    "embedded" if name == "digits" else str(write_dataset(name, scratch / f"{name}-images"))
                )
                before = run(old, source, scratch / "runs" / f"{name}-old")
                after = run(ROOT, source, scratch / "runs" / f"{name}-new")
                rows.append((name, before, after))
                print(f"{name}: old {before}, new {after}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)
    print()
    print(
        "| dataset | HOG+SVM | CNN old | CNN new | new - HOG | train s old | train s new | time new/old "
        "| steps old | steps new |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, before, after in rows:
        print(
            f"| {name} | {after['hog']:.3f} | {before['cnn']:.3f} | {after['cnn']:.3f} "
            f"| {after['cnn'] - after['hog']:+.3f} | {before['seconds']:.0f} | {after['seconds']:.0f} "
            f"| {after['seconds'] / before['seconds']:.2f} | {before['steps']} | {after['steps']} |"
        )
    matched = all(after["cnn"] >= after["hog"] for _, _, after in rows)
    print(f"\nnew CNN >= HOG on every dataset: {matched}")
    for name, before, after in rows:
        if name == "digits":
            ratio = after["seconds"] / before["seconds"]
            print(f"full digits, training time new/old: {ratio:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
